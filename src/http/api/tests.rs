//! The admin API in-process (tower `oneshot`): authentication on every route, sign-in, cookies and CSRF, rate
//! limiting, revocation, and the invite lifecycle with its error answers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::clock::{Clock, SystemClock};
use crate::domain::auth::Auth;
use crate::domain::{Enrollment, Policy};
use crate::http::{AppState, Limits, https_router};
use crate::store::Store;

const PASSWORD: &str = "correct horse battery";

pub(crate) fn state_with(store: Store, clock: Arc<dyn Clock>) -> AppState {
    let spool = std::env::temp_dir()
        .join(format!("enrolld-test-spool-{}", crate::model::Id::new(clock.now(), crate::domain::random_bytes())));
    let enrollment =
        Enrollment::new(store.clone(), clock.clone(), Policy::default(), &[7; 32]).unwrap().with_spool_dir(spool);
    let auth = Auth::new(enrollment.clone(), time::Duration::hours(12)).unwrap();
    AppState::new(
        store,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        clock,
        enrollment,
        auth,
        crate::mail::Mail::unconfigured(),
    )
}

fn app() -> (Router, AppState) {
    let state = state_with(Store::open_temporary().unwrap(), Arc::new(SystemClock));
    state.auth.bootstrap("admin", Some(PASSWORD)).unwrap();
    let limits =
        Limits { request_timeout: Duration::from_secs(10), max_body_bytes: 1 << 20, import_max_bytes: 1 << 20 };
    (https_router(state.clone(), limits), state)
}

struct Call<'a> {
    method: Method,
    path: &'a str,
    bearer: Option<&'a str>,
    cookie: Option<&'a str>,
    csrf: Option<&'a str>,
    body: Option<Value>,
    /// The TCP peer, as the accept loop records it.
    from: Option<std::net::SocketAddr>,
}

impl<'a> Call<'a> {
    fn new(method: Method, path: &'a str) -> Self {
        Call { method, path, bearer: None, cookie: None, csrf: None, body: None, from: None }
    }
    fn from(mut self, peer: &str) -> Self {
        self.from = Some(peer.parse().unwrap());
        self
    }
    fn bearer(mut self, token: &'a str) -> Self {
        self.bearer = Some(token);
        self
    }
    fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    async fn send(self, router: &Router) -> (StatusCode, HeaderMap, Value) {
        let mut request = Request::builder().method(self.method).uri(self.path);
        if let Some(token) = self.bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(cookie) = self.cookie {
            request = request.header(header::COOKIE, format!("__Host-enrolld_session={cookie}"));
        }
        if let Some(csrf) = self.csrf {
            request = request.header("x-csrf-token", csrf);
        }
        let body = match self.body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let mut request = request.body(body).unwrap();
        if let Some(peer) = self.from {
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        }
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, json)
    }
}

async fn login(router: &Router) -> (String, String, HeaderMap) {
    let (status, headers, body) = Call::new(Method::POST, "/api/v1/login")
        .json(json!({"username": "admin", "password": PASSWORD}))
        .send(router)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (body["token"].as_str().unwrap().to_owned(), body["csrf_token"].as_str().unwrap().to_owned(), headers)
}

#[tokio::test]
async fn every_route_but_sign_in_and_setup_requires_an_admin() {
    let (router, state) = app();
    let document = state.openapi.get().unwrap().clone();
    assert_eq!(document["openapi"].as_str().map(|v| &v[..3]), Some("3.1"));
    let paths = document["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", &"0".repeat(32)).replace("{username}", "someone");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, headers, body) = Call::new(method.clone(), &concrete).json(json!({})).send(&router).await;
            let public = super::PUBLIC_ROUTES.contains(&(method.as_str().to_lowercase().as_str(), path.as_str()));
            if public {
                // Not behind the admin check (a device route may still want its own credential).
                assert_ne!(body["error"], "unauthorized", "{method} {path} is public: {status} {body}");
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} answered without sign-in: {body}");
                assert_eq!(body["error"], "unauthorized");
                assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} operations in the document");
    // An invalid token is no better than none.
    let (status, _, _) = Call::new(Method::GET, "/api/v1/dashboard").bearer("forged").send(&router).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sign_in_gives_a_token_and_a_strict_cookie_and_sign_out_ends_it() {
    let (router, _) = app();
    let (status, _, body) = Call::new(Method::POST, "/api/v1/login")
        .json(json!({"username": "admin", "password": "wrong password"}))
        .send(&router)
        .await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_credentials")));

    let (token, _, headers) = login(&router).await;
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    for attribute in ["__Host-enrolld_session=", "HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let (status, _, counts) = Call::new(Method::GET, "/api/v1/dashboard").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts["pending"], 0);
    let (status, headers, _) = Call::new(Method::POST, "/api/v1/logout").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(headers[header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    let (status, _, _) = Call::new(Method::GET, "/api/v1/dashboard").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the token died with the session");
}

#[tokio::test]
async fn cookie_sessions_need_the_csrf_token_for_changes() {
    let (router, _) = app();
    let (token, csrf, _) = login(&router).await;
    let user = json!({"name": "Ann", "email": "ann@example.com"});
    let mut call = Call::new(Method::POST, "/api/v1/users").json(user.clone());
    call.cookie = Some(&token);
    let (status, _, body) = call.send(&router).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("csrf")));

    let mut call = Call::new(Method::POST, "/api/v1/users").json(user.clone());
    call.cookie = Some(&token);
    call.csrf = Some("not-the-token");
    assert_eq!(call.send(&router).await.0, StatusCode::FORBIDDEN);

    let mut call = Call::new(Method::POST, "/api/v1/users").json(user);
    call.cookie = Some(&token);
    call.csrf = Some(&csrf);
    assert_eq!(call.send(&router).await.0, StatusCode::CREATED);

    let mut read = Call::new(Method::GET, "/api/v1/users");
    read.cookie = Some(&token);
    assert_eq!(read.send(&router).await.0, StatusCode::OK, "reading needs no CSRF token");
    let bob = json!({"name": "Bob", "email": "bob@example.com"});
    let (status, _, _) = Call::new(Method::POST, "/api/v1/users").bearer(&token).json(bob).send(&router).await;
    assert_eq!(status, StatusCode::CREATED, "a bearer token is not sent by browsers on their own, so no CSRF token");
}

#[tokio::test]
async fn repeated_failures_are_answered_429_with_retry_after() {
    let (router, state) = app();
    let wrong = json!({"username": "admin", "password": "not the password"});
    for _ in 0..4 {
        let (status, _, _) = Call::new(Method::POST, "/api/v1/login").json(wrong.clone()).send(&router).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let right = json!({"username": "admin", "password": PASSWORD});
    let (status, headers, body) = Call::new(Method::POST, "/api/v1/login").json(right).send(&router).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let log = state.enrollment.audit_log(None, 50).unwrap();
    assert_eq!(log.items.iter().filter(|e| e.action == "login.failed").count(), 4);
}

/// The sign-in page's form post from `peer`: its status and headers.
async fn page_login(router: &Router, peer: &str, password: &str) -> (StatusCode, HeaderMap) {
    let mut request = Request::post("/admin/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .body(Body::from(format!("username=admin&password={}", password.replace(' ', "+"))))
        .unwrap();
    request.extensions_mut().insert(axum::extract::ConnectInfo(peer.parse::<std::net::SocketAddr>().unwrap()));
    let response = router.clone().oneshot(request).await.unwrap();
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn guesses_from_one_address_do_not_keep_the_admin_out_from_another() {
    let (router, _) = app();
    let (attacker, admin) = ("192.0.2.66:40000", "198.51.100.7:50000");
    let wrong = json!({"username": "admin", "password": "not the password"});
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let call = Call::new(Method::POST, "/api/v1/login").json(wrong.clone()).from(attacker);
        statuses.push(call.send(&router).await.0.as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 429, 429, 429, 429], "the fifth try is the first refused");
    // The attacker's address waits, on the API and the page alike: 429 with Retry-After.
    let right = json!({"username": "admin", "password": PASSWORD});
    let (status, headers, _) =
        Call::new(Method::POST, "/api/v1/login").json(right.clone()).from(attacker).send(&router).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let (status, headers) = page_login(&router, attacker, PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // The admin, from their own address, signs in on both while the guessing goes on.
    for _ in 0..3 {
        let (status, _, body) =
            Call::new(Method::POST, "/api/v1/login").json(right.clone()).from(admin).send(&router).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, headers) = page_login(&router, admin, PASSWORD).await;
        assert_eq!(
            (status, headers.get(header::LOCATION).map(|l| l.to_str().unwrap())),
            (StatusCode::SEE_OTHER, Some("/admin"))
        );
        Call::new(Method::POST, "/api/v1/login").json(wrong.clone()).from(attacker).send(&router).await;
    }
}

#[tokio::test]
async fn tokens_can_be_listed_and_revoked() {
    let (router, _) = app();
    let (mine, _, _) = login(&router).await;
    let (script, _, _) = login(&router).await;
    let (_, _, sessions) = Call::new(Method::GET, "/api/v1/sessions").bearer(&mine).send(&router).await;
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.iter().all(|s| !s.to_string().contains(&script)), "tokens are never listed");
    let script_id = &crate::pki::sha256_hex(script.as_bytes())[..16];
    let (status, _, _) =
        Call::new(Method::DELETE, &format!("/api/v1/sessions/{script_id}")).bearer(&mine).send(&router).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = Call::new(Method::GET, "/api/v1/dashboard").bearer(&script).send(&router).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(Call::new(Method::GET, "/api/v1/dashboard").bearer(&mine).send(&router).await.0, StatusCode::OK);
}

#[tokio::test]
async fn first_run_setup_over_the_api() {
    let state = state_with(Store::open_temporary().unwrap(), Arc::new(SystemClock));
    let code = state.auth.bootstrap("admin", None).unwrap().unwrap();
    let limits =
        Limits { request_timeout: Duration::from_secs(10), max_body_bytes: 1 << 20, import_max_bytes: 1 << 20 };
    let router = https_router(state, limits);
    let (_, _, status) = Call::new(Method::GET, "/api/v1/setup").send(&router).await;
    assert_eq!(status["needs_setup"], true);
    let claim = |code: &str| json!({"setup_code": code, "username": "admin", "password": PASSWORD});
    let (status, _, body) = Call::new(Method::POST, "/api/v1/setup").json(claim("AAAA-BBBB-CCCC")).send(&router).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("bad_setup_code")));
    let (status, _, body) = Call::new(Method::POST, "/api/v1/setup").json(claim(&code)).send(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(Call::new(Method::GET, "/api/v1/dashboard").bearer(&token).send(&router).await.0, StatusCode::OK);
    let (status, _, _) = Call::new(Method::POST, "/api/v1/setup").json(claim(&code)).send(&router).await;
    assert_eq!(status, StatusCode::CONFLICT, "nobody can claim it twice");
}

#[tokio::test]
async fn invite_lifecycle_and_error_answers() {
    let (router, _) = app();
    let (token, _, _) = login(&router).await;
    let post = |path: &'static str, body: Value| Call::new(Method::POST, path).json(body);

    let (status, _, body) =
        post("/api/v1/users", json!({"name": "Ann", "email": "not an email"})).bearer(&token).send(&router).await;
    assert_eq!(
        (status, body["error"].as_str(), body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid"), Some("email"))
    );
    let (status, _, body) = post("/api/v1/users", json!({"name": "Ann", "email": "ann@example.com", "colour": "red"}))
        .bearer(&token)
        .send(&router)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["message"].as_str().unwrap().contains("unknown field `colour`"), "{body}");
    let mut broken = post("/api/v1/users", json!({})).bearer(&token);
    broken.body = None;
    let (status, _, body) = broken.send(&router).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("json_expected")));

    let (status, _, user) =
        post("/api/v1/users", json!({"name": "Ann", "email": "ann@example.com"})).bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) =
        post("/api/v1/users", json!({"name": "Ann 2", "email": "ANN@example.com"})).bearer(&token).send(&router).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("email_taken")));

    let invite = json!({"user_id": user["id"], "platform": "ios", "ownership": "personal"});
    let (status, _, created) = post("/api/v1/invites", invite).bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created["link_token"].is_null() && created["passcode"].is_null());
    let id = created["invite"]["id"].as_str().unwrap().to_owned();

    let (_, _, pending) =
        Call::new(Method::GET, "/api/v1/invites?status=pending&platform=ios&q=ann").bearer(&token).send(&router).await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    assert_eq!(pending["items"][0]["email"], "ann@example.com");
    let (status, _, body) = Call::new(Method::GET, "/api/v1/invites?status=maybe").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    let resend_path = format!("/api/v1/invites/{id}/resend");
    let (status, _, resent) = Call::new(Method::POST, &resend_path).bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::OK);
    assert!(resent["invite"]["remarks"][1]["text"].as_str().unwrap().starts_with("Resent by admin"));
    let remove_path = format!("/api/v1/invites/{id}/remove");
    let (status, _, removed) = Call::new(Method::POST, &remove_path).bearer(&token).send(&router).await;
    assert_eq!((status, removed["status"].as_str()), (StatusCode::OK, Some("removed")));
    let (status, _, body) = Call::new(Method::POST, &resend_path).bearer(&token).send(&router).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("invite_removed")));

    let by_myself = json!({"user_id": user["id"], "platform": "any"});
    let (status, _, mine) = post("/api/v1/invites/by-myself", by_myself).bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(mine["link_token"].as_str().unwrap().len(), 43, "256-bit token, base64url");
    assert_eq!(mine["passcode"].as_str().unwrap().len(), 8);

    let missing = format!("/api/v1/invites/{}", "f".repeat(32));
    assert_eq!(Call::new(Method::GET, &missing).bearer(&token).send(&router).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        Call::new(Method::GET, "/api/v1/invites/nonsense").bearer(&token).send(&router).await.0,
        StatusCode::NOT_FOUND
    );

    let (_, _, audit) = Call::new(Method::GET, "/api/v1/audit?limit=3").bearer(&token).send(&router).await;
    assert_eq!(audit["items"][0]["action"], "invite.by_myself", "newest first");
    assert!(audit["next_cursor"].is_string());
    let (status, _, document) = Call::new(Method::GET, "/api/v1/openapi.json").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::OK);
    assert!(document["components"]["schemas"]["InviteView"].is_object());

    // The description tells the truth: what the shared layers answer is declared, and the lists' constraints are
    // the ones the server holds to.
    let path = |p: &str, method: &str| document["paths"][p][method]["responses"].clone();
    assert_eq!(
        path("/api/v1/users", "get")["401"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Error"
    );
    assert!(path("/api/v1/users", "post")["415"].is_object(), "a JSON body can be refused as not JSON");
    assert!(path("/api/v1/users/{id}", "patch")["404"].is_object());
    assert!(path("/api/v1/users/{id}", "patch")["403"].is_object(), "changes can be refused for CSRF");
    assert!(path("/api/v1/login", "post")["401"].is_object(), "sign-in declares its own");
    let limit = document["paths"]["/api/v1/audit"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap()["schema"]
        .clone();
    assert_eq!((limit["minimum"].as_u64(), limit["maximum"].as_u64()), (Some(1), Some(500)), "{limit}");
    for (query, status) in
        [("limit=0", 422), ("limit=501", 422), ("limit=500", 200), ("cursor=AB", 200), ("cursor=A", 422)]
    {
        let path = format!("/api/v1/audit?{query}");
        assert_eq!(Call::new(Method::GET, &path).bearer(&token).send(&router).await.0.as_u16(), status, "{query}");
    }
    let (status, _, _) = Call::new(Method::GET, "/api/v1/invites?order=").bearer(&token).send(&router).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "the pattern says newest or oldest, and so does the server");
}

async fn upload(router: &Router, token: &str, query: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::post(format!("/api/v1/imports?{query}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "text/csv")
        .body(Body::from(body))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn text(router: &Router, token: &str, path: &str) -> (StatusCode, HeaderMap, String) {
    let request =
        Request::get(path).header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_uploads_run_as_jobs_with_a_report_and_lists_export_as_csv() {
    let (router, _) = app();
    let (token, _, _) = login(&router).await;
    let file = "user name,email address,platform type,group name\nAnn,ann@example.com,iOS,Sales\nBob,bob@,Android,\n";

    let (status, refused) = upload(&router, &token, "kind=invites&wait=true&filename=people.csv", file.into()).await;
    assert_eq!(status, StatusCode::OK, "{refused}");
    assert_eq!(refused["state"], "rejected");
    assert_eq!(refused["report"]["problems"][0]["line"], 3);
    assert_eq!(refused["report"]["problems"][0]["column"], "EMAIL ADDRESS");

    let (status, queued) = upload(&router, &token, "kind=invites&mode=valid_only", file.into()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let path = format!("/api/v1/imports/{}", queued["id"].as_str().unwrap());
    let mut done = Value::Null;
    for _ in 0..200 {
        let (_, _, polled) = Call::new(Method::GET, &path).bearer(&token).send(&router).await;
        if polled["state"] == "done" {
            done = polled;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(done["report"]["invites_created"], 1, "{done}");
    assert_eq!(done["report"]["groups_created"][0], "Sales");
    let (_, _, listed) = Call::new(Method::GET, "/api/v1/imports").bearer(&token).send(&router).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);

    let (status, headers, csv) = text(&router, &token, "/api/v1/invites/export?status=pending").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert!(headers[header::CONTENT_DISPOSITION].to_str().unwrap().contains("enrolld-invites-pending.csv"));
    assert!(csv.starts_with(
        "\u{feff}USER NAME,EMAIL ADDRESS,PLATFORM TYPE,OWNED BY,DOMAIN NAME,GROUP NAME,PHONE NUMBER,STATUS"
    ));
    assert!(csv.contains("Ann,ann@example.com,iOS,Corporate,,Sales,,pending"), "{csv}");
    for path in ["/api/v1/staged/export", "/api/v1/devices/export", "/api/v1/imports/sample?kind=staged"] {
        let (status, _, body) = text(&router, &token, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(body.contains("SERIAL NUMBER"), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_uploads_and_bodies_get_413_in_the_api_format() {
    let (router, _) = app();
    let (token, _, _) = login(&router).await;
    let big = vec![b'x'; (1 << 20) + 10];
    let (status, body) = upload(&router, &token, "kind=invites", big).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("import_max_bytes"));
    let (_, _, listed) = Call::new(Method::GET, "/api/v1/imports").bearer(&token).send(&router).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(0), "refused before any job was made");

    let huge_name = "x".repeat(2 << 20);
    let (status, _, body) = Call::new(Method::POST, "/api/v1/users")
        .bearer(&token)
        .json(json!({"name": huge_name, "email": "a@example.com"}))
        .send(&router)
        .await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
}

/// A box with a state directory (a CA in `pki/`) and an admin, for backups.
fn app_with_state_dir(dir: &std::path::Path) -> (Router, AppState) {
    crate::pki::CertificateAuthority::load_or_create(&dir.join("pki"), "enroll", SystemClock.now()).unwrap();
    let mut state = state_with(Store::open(&dir.join("db")).unwrap(), Arc::new(SystemClock));
    state.state_dir = Some(Arc::new(dir.to_owned()));
    state.auth.bootstrap("admin", Some(PASSWORD)).unwrap();
    let limits =
        Limits { request_timeout: Duration::from_secs(30), max_body_bytes: 1 << 20, import_max_bytes: 1 << 20 };
    (https_router(state.clone(), limits), state)
}

async fn bytes_of(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = router.clone().oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 26).await.unwrap();
    (status, headers, bytes.to_vec())
}

async fn dashboard(router: &Router, token: &str) -> String {
    let request =
        Request::get("/admin").header(header::COOKIE, format!("__Host-enrolld_session={token}")).body(Body::empty());
    let (status, _, page) = bytes_of(router, request.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(page).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_download_through_the_api_and_the_settings_page_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (router, state) = app_with_state_dir(dir.path());
    let (token, csrf, _) = login(&router).await;
    let passphrase = "a passphrase worth keeping";

    let (status, _, refused) = Call::new(Method::POST, "/api/v1/backup")
        .bearer(&token)
        .json(json!({"passphrase": "short"}))
        .send(&router)
        .await;
    assert_eq!(
        (status, refused["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("passphrase")),
        "{refused}"
    );
    assert_eq!(state.enrollment.last_backup().unwrap(), None);
    assert!(dashboard(&router, &token).await.contains("No backup yet"));

    let request = Request::post("/api/v1/backup")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"passphrase": passphrase}).to_string()))
        .unwrap();
    let (status, headers, file) = bytes_of(&router, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
    let disposition = headers[header::CONTENT_DISPOSITION].to_str().unwrap();
    assert!(disposition.starts_with("attachment; filename=\"enrolld-backup-enroll-2"), "{disposition}");
    assert_eq!(headers[header::CONTENT_LENGTH].to_str().unwrap(), file.len().to_string());
    assert!(!file.windows(passphrase.len()).any(|w| w == passphrase.as_bytes()));
    let restored_dir = dir.path().join("restored");
    let restored = crate::backup::open(file.as_slice())
        .unwrap()
        .restore(&crate::backup::Passphrase::given(passphrase), &restored_dir)
        .unwrap();
    assert_eq!(restored.trailer.count("admins"), 1);
    assert_eq!(restored.trailer.count("sessions"), 0, "the session this request came with stays out");
    // Recorded once the whole file was handed over (by a task of its own).
    let mut last = None;
    for _ in 0..200 {
        last = state.enrollment.last_backup().unwrap();
        if last.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = last.expect("the download is recorded");
    assert_eq!((last.bytes, last.how.as_str(), last.by.as_str()), (file.len() as u64, "api", "admin"));

    // The Settings page: the passphrase typed twice, the session's CSRF token; a mismatch comes back on the page.
    let form = |confirm: &str| {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("csrf", &csrf)
            .append_pair("passphrase", passphrase)
            .append_pair("confirm", confirm)
            .finish();
        Request::post("/admin/settings/backup")
            .header(header::COOKIE, format!("__Host-enrolld_session={token}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap()
    };
    let (status, _, page) = bytes_of(&router, form("something else entirely")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(String::from_utf8_lossy(&page).contains("The two passphrases are not the same."));
    let (status, headers, file) = bytes_of(&router, form(passphrase)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_DISPOSITION].to_str().unwrap().starts_with("attachment;"));
    assert!(file.starts_with(b"ENROLLD-BACKUP 1\n"));
    assert!(dashboard(&router, &token).await.contains("Last backup: "), "the dashboard says when");

    let (_, _, audit) = Call::new(Method::GET, "/api/v1/audit?limit=20").bearer(&token).send(&router).await;
    let backups: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "backup.downloaded").collect();
    assert!(!backups.is_empty(), "{audit}");
    assert!(!audit.to_string().contains(passphrase), "never the passphrase");
}

/// A bundle as `image/build` makes it, as far as enrolld reads it: a tar archive whose first member is the manifest.
fn bundle(arch: &str, version: &str) -> Vec<u8> {
    let manifest = format!("FORMAT=1\nVERSION={version}\nARCH={arch}\nROOT_BYTES=512\nCMDLINE=rw quiet\n");
    let mut out = Vec::new();
    for (name, data) in [("manifest", manifest.as_bytes()), ("SHA256SUMS", b"sums\n".as_slice())] {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

async fn put_bundle(router: &Router, token: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::put("/api/v1/system/upgrade")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(bytes))
        .unwrap();
    let (status, _, body) = bytes_of(router, request).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_bundles_are_taken_only_on_the_appliance_and_only_for_this_box() {
    let dir = tempfile::tempdir().unwrap();
    let (router, state) = app_with_state_dir(dir.path());
    let (token, csrf, _) = login(&router).await;
    let (status, refused) = put_bundle(&router, &token, bundle("amd64", "0.2.0")).await;
    assert_eq!((status, refused["error"].as_str()), (StatusCode::CONFLICT, Some("not_appliance")), "{refused}");

    // The same box, now running from the appliance image.
    let release = dir.path().join("enrolld-release");
    std::fs::write(&release, "VERSION=0.1.0-1\nARCH=amd64\n").unwrap();
    let mut state = state;
    state.upgrades = Some(Arc::new(crate::upgrade::Upgrades::new(dir.path(), &release, 1 << 20)));
    let limits = Limits { request_timeout: Duration::from_secs(30), max_body_bytes: 4096, import_max_bytes: 4096 };
    let router = https_router(state.clone(), limits);
    let (_, _, status) = Call::new(Method::GET, "/api/v1/system/upgrade").bearer(&token).send(&router).await;
    assert_eq!((status["running"]["version"].as_str(), status["state"].as_str()), (Some("0.1.0-1"), Some("idle")));

    for (bytes, code) in [
        (bundle("arm64", "0.2.0"), "wrong_architecture"),
        (bundle("amd64", "0.1.0-1"), "same_version"),
        (b"PK\x03\x04 not a tar".repeat(100), "not_a_bundle"),
    ] {
        let (status, refused) = put_bundle(&router, &token, bytes).await;
        assert_eq!((status, refused["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{refused}");
    }
    assert!(std::fs::read_dir(dir.path().join("upgrade")).unwrap().next().is_none(), "nothing refused is kept");
    let (status, _) = put_bundle(&router, &token, vec![0; (1 << 20) + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Larger than any JSON body the API takes: the upgrade route has its own limit.
    let mut good = bundle("amd64", "0.2.0");
    good.resize(64 << 10, 0);
    let (status, accepted) = put_bundle(&router, &token, good.clone()).await;
    assert_eq!((status, accepted["state"].as_str()), (StatusCode::ACCEPTED, Some("waiting")), "{accepted}");
    assert_eq!(accepted["version"], "0.2.0");
    assert_eq!(std::fs::read(dir.path().join("upgrade/bundle.update")).unwrap(), good);
    assert!(dir.path().join("upgrade/request").exists(), "the installer's cue");
    let (status, busy) = put_bundle(&router, &token, bundle("amd64", "0.3.0")).await;
    assert_eq!((status, busy["error"].as_str()), (StatusCode::CONFLICT, Some("upgrade_under_way")));
    let (_, _, audit) = Call::new(Method::GET, "/api/v1/audit?limit=20").bearer(&token).send(&router).await;
    assert!(audit.to_string().contains("upgrade.uploaded"), "{audit}");

    // The installer refuses it (its signature, say): the Settings page says so, and takes the next one, CSRF
    // token first.
    std::fs::remove_file(dir.path().join("upgrade/request")).unwrap();
    let status_file = dir.path().join("upgrade/status");
    std::fs::write(&status_file, "state=failed\nversion=0.2.0\nmessage=it is not signed by a key this box trusts\n")
        .unwrap();
    let settings = Request::get("/admin/settings")
        .header(header::COOKIE, format!("__Host-enrolld_session={token}"))
        .body(Body::empty())
        .unwrap();
    let (_, _, page) = bytes_of(&router, settings).await;
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("This box runs enrolld 0.1.0-1 (amd64)"), "{page}");
    assert!(page.contains("it is not signed by a key this box trusts"));
    let multipart = |csrf: &str, bytes: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(b"--XX\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n");
        body.extend_from_slice(csrf.as_bytes());
        body.extend_from_slice(b"\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.update\"\r\n");
        body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n--XX--\r\n");
        Request::post("/admin/settings/upgrade")
            .header(header::COOKIE, format!("__Host-enrolld_session={token}"))
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XX")
            .body(Body::from(body))
            .unwrap()
    };
    let (status, _, _) = bytes_of(&router, multipart("forged", &bundle("amd64", "0.2.1"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!dir.path().join("upgrade/request").exists(), "a forged post hands nothing over");
    let (status, _, page) = bytes_of(&router, multipart(&csrf, &bundle("arm64", "0.2.1"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(String::from_utf8_lossy(&page).contains("this box is amd64"));
    let (status, headers, _) = bytes_of(&router, multipart(&csrf, &bundle("amd64", "0.2.1"))).await;
    assert_eq!(
        (status, headers[header::LOCATION].to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/admin/settings#upgrade")
    );
    assert!(dir.path().join("upgrade/request").exists());
    assert!(!status_file.exists(), "the last installer's answer is cleared for the new bundle");
}

/// The rules added to the generated schemas name schemas and properties by text: one renamed on the Rust side would
/// otherwise drop its rules from the description without a word.
#[tokio::test]
async fn every_refinement_names_what_is_there() {
    let (_, state) = app();
    let document = state.openapi.get().unwrap();
    let schemas = &document["components"]["schemas"];
    for (name, extra) in super::schema_refinements() {
        let schema = &schemas[name];
        assert!(schema.is_object(), "no schema {name} to refine");
        let branches = ["anyOf", "oneOf"].iter().flat_map(|key| extra[key].as_array().into_iter().flatten());
        let mut named: Vec<String> = Vec::new();
        for rules in std::iter::once(&extra).chain(branches) {
            named.extend(rules["properties"].as_object().into_iter().flatten().map(|(key, _)| key.clone()));
            named
                .extend(rules["required"].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from));
        }
        assert!(!named.is_empty(), "{name}: a refinement names the properties it concerns");
        for property in named {
            assert!(schema["properties"][&property].is_object(), "{name} has no property {property}");
        }
    }
    for (path, method, media_type) in [
        ("/api/v1/imports", "post", "text/csv"),
        ("/api/v1/settings/android/apk", "put", "application/vnd.android.package-archive"),
    ] {
        let file = &document["paths"][path][method]["requestBody"]["content"][media_type];
        assert!(file.is_object() && file.get("schema").is_none(), "{path}: a file is bytes, not JSON: {file}");
    }
    let template = &document["paths"]["/api/v1/mail/templates/{name}"];
    assert!(template.as_object().is_some_and(|operations| !operations.is_empty()));
    for operation in template.as_object().unwrap().values() {
        let name = operation["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "name").unwrap();
        assert!(name["schema"]["enum"].is_array(), "{name}");
    }
}
