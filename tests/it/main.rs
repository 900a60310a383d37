//! Integration tests, in one binary: the real `enrolld` started as a process on free ports with a temporary state
//! directory, driven from outside as an admin, a device or a second host on the LAN would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin_ui;
mod android;
mod api;
mod apple;
mod apple_device;
mod backup;
mod browser;
mod common;
mod config_errors;
mod connections;
mod daemon;
mod enroll;
mod firstboot;
mod mail;
mod mdm;
mod mdns;
mod windows;
