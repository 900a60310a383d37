//! BER to DER, for what Apple devices send. Their CMS encoder writes BER (X.690): indefinite lengths ended by
//! end-of-contents octets, and OCTET STRINGs in constructed, chunked form. The `der` crate reads DER only, so
//! messages are rewritten first: every length made definite, every constructed OCTET STRING joined into one.
//! Anything already DER comes out unchanged. Nesting is limited, so hostile input cannot exhaust the stack.
//!
//! No released crate converts BER for `der` 0.7 (the version `cms` 0.2 is built on), hence these few lines.

/// How deep values may nest; CMS messages need about a dozen levels.
const MAX_DEPTH: usize = 64;

const OCTET_STRING: u8 = 0x04;
const CONSTRUCTED: u8 = 0x20;

/// Rewrites one BER value (the whole of `input`) as DER.
pub fn to_der(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(input.len());
    let used = value(input, &mut out, 0)?;
    if used != input.len() {
        return Err(format!("{} bytes follow the value", input.len() - used));
    }
    Ok(out)
}

/// A value's identifier octets: their length and whether it is constructed.
fn identifier(input: &[u8]) -> Result<(usize, bool), String> {
    let first = *input.first().ok_or("the value ends early")?;
    let mut len = 1;
    if first & 0x1f == 0x1f {
        // High tag number: base-128 octets, the last without the top bit.
        loop {
            let byte = *input.get(len).ok_or("the tag ends early")?;
            len += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if len > 6 {
                return Err("the tag number is too large".into());
            }
        }
    }
    Ok((len, first & CONSTRUCTED != 0))
}

/// Length octets: `Some(length)` or `None` for the indefinite form, and how many octets they took.
fn length(input: &[u8]) -> Result<(Option<usize>, usize), String> {
    let first = *input.first().ok_or("the length ends early")?;
    match first {
        0x80 => Ok((None, 1)),
        short if short < 0x80 => Ok((Some(usize::from(short)), 1)),
        long => {
            let count = usize::from(long & 0x7f);
            if count > 4 {
                return Err("the length is too large".into());
            }
            let bytes = input.get(1..=count).ok_or("the length ends early")?;
            let value = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            Ok((Some(value), 1 + count))
        }
    }
}

fn push_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Converts the value at the start of `input` into `out`; returns how many input bytes it took.
fn value(input: &[u8], out: &mut Vec<u8>, depth: usize) -> Result<usize, String> {
    if depth > MAX_DEPTH {
        return Err("values nest too deeply".into());
    }
    let (tag_len, constructed) = identifier(input)?;
    let (len, len_len) = length(&input[tag_len..])?;
    let start = tag_len + len_len;
    if !constructed {
        let len = len.ok_or("a primitive value has an indefinite length")?;
        let end = start.checked_add(len).filter(|end| *end <= input.len()).ok_or("the value ends early")?;
        out.extend_from_slice(&input[..tag_len]);
        push_length(out, len);
        out.extend_from_slice(&input[start..end]);
        return Ok(end);
    }
    // The contents, converted, and how far they reached.
    let mut contents = Vec::new();
    let mut pos = start;
    let end = match len {
        Some(len) => {
            let end = start.checked_add(len).filter(|end| *end <= input.len()).ok_or("the value ends early")?;
            while pos < end {
                pos += value(&input[pos..end], &mut contents, depth + 1)?;
            }
            end
        }
        None => loop {
            match input.get(pos..pos + 2) {
                Some([0, 0]) => break pos + 2,
                Some(_) => pos += value(&input[pos..], &mut contents, depth + 1)?,
                None => return Err("an indefinite-length value has no end-of-contents".into()),
            }
        },
    };
    if input[0] == OCTET_STRING | CONSTRUCTED {
        // A chunked OCTET STRING: its chunks, already converted to primitive OCTET STRINGs, are joined.
        let joined = octet_chunks(&contents)?;
        out.push(OCTET_STRING);
        push_length(out, joined.len());
        out.extend(joined);
    } else {
        out.extend_from_slice(&input[..tag_len]);
        push_length(out, contents.len());
        out.extend(contents);
    }
    Ok(end)
}

/// The joined contents of consecutive DER OCTET STRINGs.
pub fn octet_chunks(mut der: &[u8]) -> Result<Vec<u8>, String> {
    let mut joined = Vec::new();
    while !der.is_empty() {
        if der[0] != OCTET_STRING {
            return Err("a chunked OCTET STRING holds something else".into());
        }
        let (len, len_len) = length(&der[1..])?;
        let len = len.ok_or("a chunk has an indefinite length")?;
        let chunk = der.get(1 + len_len..1 + len_len + len).ok_or("a chunk ends early")?;
        joined.extend_from_slice(chunk);
        der = &der[1 + len_len + len..];
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indefinite_lengths_become_definite_and_chunks_are_joined() {
        // SEQUENCE (indefinite) { OCTET STRING (constructed, indefinite) { "ab", "cd" }, INTEGER 5 }
        let ber = [0x30, 0x80, 0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x04, 0x02, b'c', b'd', 0, 0, 0x02, 0x01, 5, 0, 0];
        assert_eq!(to_der(&ber).unwrap(), [0x30, 0x09, 0x04, 0x04, b'a', b'b', b'c', b'd', 0x02, 0x01, 5]);
    }

    #[test]
    fn der_passes_through_unchanged() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(to_der(cert.der()).unwrap(), cert.der().to_vec());
        // A long form length (300 bytes of content).
        let mut long = vec![0x04, 0x82, 0x01, 0x2c];
        long.extend([7u8; 300]);
        assert_eq!(to_der(&long).unwrap(), long);
    }

    #[test]
    fn hostile_input_is_refused_not_a_panic_or_a_stack_overflow() {
        let deep: Vec<u8> = std::iter::repeat_n([0x30u8, 0x80], 10_000).flatten().collect();
        assert!(to_der(&deep).unwrap_err().contains("nest"));
        for bad in
            [&[][..], &[0x30], &[0x30, 0x80, 0x02], &[0x04, 0x85, 1, 2, 3, 4, 5], &[0x04, 0x80, 0, 0], &[0x04, 0x05, 1]]
        {
            assert!(to_der(bad).is_err(), "{bad:?}");
        }
        assert!(to_der(&[0x05, 0x00, 0xff]).unwrap_err().contains("follow"));
    }
}
