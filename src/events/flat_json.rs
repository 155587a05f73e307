//! A JSON object read in place, for the payloads as contimg writes them: one object of
//! known keys, each at most once, whose values are plain strings (no escapes), unsigned
//! integers, `true`, `false`, `null` or `{}`. Anything else (an escape, a key not asked
//! for, a repeated key, a nested value, a sign, a fraction, an exponent, trailing text)
//! makes [`read_object`] or a field's helper answer `None`, and the caller reads the
//! payload with serde_json, which then accepts or refuses it as it always has. So this
//! reader never refuses a payload and never reads one differently: where it answers,
//! serde_json would give the same values (the tests hold it to that with serde_json as
//! the oracle).
//!
//! It exists for speed: serde_json's general machinery was about 40% of a whole-log
//! fold's instructions, on payloads that almost always have this plain form.

/// One value of a plain object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// A string with no escapes and no control characters, as it stands in the text.
    Str(&'a str),
    /// A run of decimal digits without a leading zero (or `0` alone) that fits a `u64`.
    UInt(u64),
    Bool(bool),
    Null,
    /// `{}`.
    EmptyObject,
}

/// The values of `text`'s keys, in the order of `names` (`None` for a key it lacks), when
/// `text` is a plain object (module docs) with no key outside `names`; `None` otherwise.
/// Whether each value is of its field's type is the caller's to check (the helpers
/// below). `names` must be distinct, and none may hold `"`, `\` or a control character
/// (field names are plain words), since a key is first compared to a name as bytes.
pub fn read_object<'a, const N: usize>(
    text: &'a str,
    names: &[&str; N],
) -> Option<[Option<Value<'a>>; N]> {
    debug_assert!(
        names
            .iter()
            .all(|n| n.bytes().all(|c| c > 0x1F && c != b'"' && c != b'\\')),
        "field names are plain: {names:?}"
    );
    let b = text.as_bytes();
    let mut out = [None; N];
    // The index in `names` of the key read last, plus one.
    let mut expected = 0;
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            // Written payloads have their keys in the order of `names`: the key expected
            // next is tried first, as bytes (a name has no byte a string must escape).
            let (k, next) = match names.get(expected) {
                Some(name) if is_key(b, i + 1, name) => (expected, i + 2 + name.len()),
                _ => {
                    let (key, next) = string(text, i + 1)?;
                    (names.iter().position(|n| *n == key)?, next)
                }
            };
            if out[k].is_some() {
                return None;
            }
            expected = k + 1;
            i = skip_ws(b, next);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
            let (v, next) = value(text, i)?;
            out[k] = Some(v);
            i = skip_ws(b, next);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(out)
}

/// Whether the string starting at `i` (after its quote) is `name`, closed.
#[inline]
fn is_key(b: &[u8], i: usize, name: &str) -> bool {
    b.get(i..i + name.len()) == Some(name.as_bytes()) && b.get(i + name.len()) == Some(&b'"')
}

/// The first index from `i` that is not JSON whitespace.
#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The value starting at `i`, and the index after it. It reads only as far as the value's
/// first token: it answers for `truex`, `nullx` and the `0` of `01` or `0.5`, which
/// [`read_object`] then refuses, as only whitespace, `,` or `}` may follow a value. Not for
/// use where that is not checked.
fn value(text: &str, i: usize) -> Option<(Value<'_>, usize)> {
    let b = text.as_bytes();
    let rest = &b[i.min(b.len())..];
    match *rest.first()? {
        b'"' => string(text, i + 1).map(|(s, next)| (Value::Str(s), next)),
        b't' if rest.starts_with(b"true") => Some((Value::Bool(true), i + 4)),
        b'f' if rest.starts_with(b"false") => Some((Value::Bool(false), i + 5)),
        b'n' if rest.starts_with(b"null") => Some((Value::Null, i + 4)),
        b'{' => {
            let close = skip_ws(b, i + 1);
            (b.get(close) == Some(&b'}')).then_some((Value::EmptyObject, close + 1))
        }
        // A run of digits without a leading zero (`01`, `1.5` and `1e3` are refused by
        // the caller, see above).
        b'0' => Some((Value::UInt(0), i + 1)),
        b'1'..=b'9' => {
            let mut n: u64 = 0;
            let mut j = 0;
            while let Some(d @ b'0'..=b'9') = rest.get(j) {
                n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                j += 1;
            }
            Some((Value::UInt(n), i + j))
        }
        _ => None,
    }
}

/// The string whose text starts at `i` (after its opening quote), and the index after its
/// closing quote; `None` if an escape or a control character comes first, or no quote.
#[inline]
fn string(text: &str, i: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    let mut j = i;
    // Sixteen bytes at a time where SSE2 is (every x86-64 processor has it).
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    while j + 16 <= b.len() {
        let marks = special16(b, j);
        if marks != 0 {
            j += marks.trailing_zeros() as usize;
            return end(text, i, j);
        }
        j += 16;
    }
    // Eight bytes at a time; the lowest marked byte is the first special one.
    while let Some(chunk) = b.get(j..j + 8) {
        let marks = special(u64::from_le_bytes(chunk.try_into().ok()?));
        if marks != 0 {
            j += (marks.trailing_zeros() / 8) as usize;
            return end(text, i, j);
        }
        j += 8;
    }
    // The last few bytes of the text, one at a time.
    while let Some(&c) = b.get(j) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return end(text, i, j);
        }
        j += 1;
    }
    None
}

/// The string from `i` to `j`, where the first special byte is, if that byte closes it.
#[inline]
fn end(text: &str, i: usize, j: usize) -> Option<(&str, usize)> {
    if text.as_bytes()[j] != b'"' {
        return None;
    }
    Some((text.get(i..j)?, j + 1))
}

/// One bit for each of the 16 bytes of `b` from `j` that is `"`, `\`, or below 0x20, the
/// lowest bit for the byte at `j`. Panics unless `j + 16 <= b.len()`.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
fn special16(b: &[u8], j: usize) -> u32 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let chunk = &b[j..j + 16];
    // SAFETY: `chunk` holds 16 bytes, which the unaligned load reads; SSE2 is enabled for
    // this build (the `cfg` above), so its instructions are there.
    unsafe {
        let x = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
        let quote = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
        // Below 0x20 (unsigned): the byte is its own minimum with 0x1F.
        let control = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1F)), x);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

/// The high bit of each byte of `w` that is `"`, `\`, or below 0x20, marked, the bytes
/// taken in little-endian order. Each test marks its lowest such byte exactly (a borrow
/// only runs upwards, so it may mark bytes above that one wrongly), so the lowest mark of
/// all is the first special byte.
#[inline]
fn special(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let quote = zero(w ^ (ONES * u64::from(b'"')));
    let backslash = zero(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    quote | backslash | control
}

// How a field of each kind is read from a plain object, as serde reads it: `None` when
// serde_json would refuse the value (or the reader cannot tell), so the caller leaves the
// payload to serde_json.

/// A required string, owned (`String`) or borrowed from the text (`&str`).
pub fn text<'a, S: From<&'a str>>(v: Option<Value<'a>>) -> Option<S> {
    match v? {
        Value::Str(s) => Some(S::from(s)),
        _ => None,
    }
}

/// An `Option<String>` (or `Option<&str>`): missing and `null` are `None`.
pub fn opt_text<'a, S: From<&'a str>>(v: Option<Value<'a>>) -> Option<Option<S>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::Str(s)) => Some(Some(S::from(s))),
        Some(_) => None,
    }
}

/// A required `u32`.
pub fn uint32(v: Option<Value<'_>>) -> Option<u32> {
    match v? {
        Value::UInt(n) => u32::try_from(n).ok(),
        _ => None,
    }
}

/// A `u64` that is `default` when missing (`null` is refused, as serde refuses it).
pub fn uint_or(v: Option<Value<'_>>, default: u64) -> Option<u64> {
    match v {
        None => Some(default),
        Some(Value::UInt(n)) => Some(n),
        Some(_) => None,
    }
}

/// An `Option<u64>`: missing and `null` are `None`.
pub fn opt_uint(v: Option<Value<'_>>) -> Option<Option<u64>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::UInt(n)) => Some(Some(n)),
        Some(_) => None,
    }
}

/// A required `bool`.
pub fn flag(v: Option<Value<'_>>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(b),
        _ => None,
    }
}

/// A `bool` that is `default` when missing.
pub fn flag_or(v: Option<Value<'_>>, default: bool) -> Option<bool> {
    match v {
        None => Some(default),
        Some(Value::Bool(b)) => Some(b),
        Some(_) => None,
    }
}

/// A map that is empty when missing; only an empty one is read here.
pub fn empty_map<K: Ord, V>(v: Option<Value<'_>>) -> Option<std::collections::BTreeMap<K, V>> {
    match v {
        None | Some(Value::EmptyObject) => Some(std::collections::BTreeMap::new()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 3] = ["a", "bb", "c"];

    #[test]
    fn plain_objects_are_read() {
        let got = read_object(
            " {\"bb\" :\t\"x y\",\n\"a\":18446744073709551615, \"c\":null}\r\n",
            &NAMES,
        );
        assert_eq!(
            got,
            Some([
                Some(Value::UInt(u64::MAX)),
                Some(Value::Str("x y")),
                Some(Value::Null)
            ])
        );
        assert_eq!(read_object("{}", &NAMES), Some([None, None, None]));
        assert_eq!(
            read_object("{\"a\":{ },\"c\":false,\"bb\":0}", &NAMES),
            Some([
                Some(Value::EmptyObject),
                Some(Value::UInt(0)),
                Some(Value::Bool(false))
            ])
        );
    }

    #[test]
    fn anything_else_is_left_to_serde_json() {
        for text in [
            "",
            "[]",
            "{",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{\"a\":1,\"a\":2}",
            "{\"d\":1}",
            "{\"a\":-1}",
            "{\"a\":01}",
            "{\"a\":1.0}",
            "{\"a\":1e3}",
            "{\"a\":0.5}",
            "{\"a\":18446744073709551616}",
            "{\"a\":\"x\\\"\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":{\"k\":\"v\"}}",
            "{\"a\":[]}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\" 1}",
            "{\"a\":\"unterminated",
            "{\"a\\u0000\":1}",
        ] {
            assert_eq!(read_object(text, &NAMES), None, "{text:?}");
        }
    }

    #[test]
    fn a_special_byte_is_found_at_every_place_of_a_long_string() {
        for special in ['"', '\\', '\u{0}', '\n', '\u{1F}'] {
            for at in 0..40 {
                let mut s: Vec<char> = "abcdefghijklmnopqrstuvwxyz0123456789ABCD".chars().collect();
                s[at] = special;
                let s: String = s.into_iter().collect();
                let text = format!("{{\"a\":\"{s}\"}}");
                let got = read_object(&text, &NAMES);
                if special == '"' {
                    // The string ends there, and what follows is not `,` or `}`.
                    assert_eq!(got, None, "{text:?}");
                    let cut = format!("{{\"a\":\"{}\"}}", &s[..at]);
                    assert_eq!(
                        read_object(&cut, &NAMES),
                        Some([Some(Value::Str(&s[..at])), None, None])
                    );
                } else {
                    assert_eq!(got, None, "{special:?} at {at}");
                }
            }
        }
        // Bytes either side of the special ranges are plain.
        let text = "{\"a\":\"\u{20}!#[]\u{7F}é\u{1F4E1}abcdefgh\"}";
        assert_eq!(
            read_object(text, &NAMES),
            Some([
                Some(Value::Str("\u{20}!#[]\u{7F}é\u{1F4E1}abcdefgh")),
                None,
                None
            ])
        );
    }
}
