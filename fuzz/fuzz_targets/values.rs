//! The value parsers of `net.rs`, list splitting and Go's bool/duration syntax, on arbitrary
//! bytes: never a panic; an accepted value renders as one safe token that parses back to
//! itself; a refusal is one line.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use fuzz_checks::{assert_one_line, check_value};
use istio_init::settings::config::quote;
use istio_init::net::{
    Cidr, Group, Id, Iface, Mark, Port, PortItem, RouteTable, parse_go_bool, parse_go_duration,
    split_list, utf8,
};
use libfuzzer_sys::fuzz_target;

fn all_types(s: &str) {
    check_value::<Port>(s);
    check_value::<PortItem>(s);
    check_value::<Cidr>(s);
    check_value::<Iface>(s);
    check_value::<Id>(s);
    check_value::<Group>(s);
    check_value::<Mark>(s);
    check_value::<RouteTable>(s);
}

fuzz_target!(|data: &[u8]| {
    let s = match utf8(OsStr::from_bytes(data)) {
        Ok(s) => s,
        Err(reason) => {
            assert!(std::str::from_utf8(data).is_err());
            assert_one_line(&reason);
            return;
        }
    };
    all_types(s);
    for item in split_list(s) {
        assert!(!item.is_empty() && !item.contains(','), "{item:?}");
        assert_eq!(item, item.trim(), "untrimmed item");
        all_types(item);
    }
    if let Ok(b) = parse_go_bool(s) {
        let spellings: &[&str] = if b {
            &["1", "t", "T", "TRUE", "true", "True"]
        } else {
            &["0", "f", "F", "FALSE", "false", "False"]
        };
        assert!(spellings.contains(&s), "{s:?} → {b}");
    }
    match parse_go_duration(s) {
        Ok(d) => assert!(d.as_secs() <= 86_400 * 366, "{s:?} → {d:?}"),
        Err(reason) => assert_one_line(&reason),
    }
    let q = quote(s);
    assert_one_line(&q);
    // Escaping turns a byte into at most 6 characters (`\u{7f}`); the cut is at 120 bytes.
    assert!(q.len() <= 6 * 120 + 40, "quote of {} bytes is {} bytes", s.len(), q.len());
});
