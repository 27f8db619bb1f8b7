//! The nf_tables tables of the calling thread's network namespace, over `NETLINK_NETFILTER`:
//! the handover's "is this namespace fresh" probe (apply/fast.rs), and what a coexistence check
//! (which other tables are there, by family and name) needs.
//!
//! Effects: one `NETLINK_NETFILTER` socket and one dump.

use anyhow::anyhow;
use netlink_packet_netfilter::nftables::{NfTablesMessage, TableAttribute, TableMessage};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use nix::libc::NFNETLINK_V0;

use super::Socket;
use crate::net::Family;

/// One nf_tables table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its family (`ip`, `ip6`, `inet`, …, as nf_tables numbers them).
    pub family: NetfilterProtoFamily,
    pub name: String,
}

/// The nf_tables family that holds a family's iptables-nft tables.
pub fn nfproto(family: Family) -> NetfilterProtoFamily {
    match family {
        Family::V4 => NetfilterProtoFamily::IPv4,
        Family::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// The request that dumps the tables of `family` (every family: `Unspec`).
fn request(family: NetfilterProtoFamily) -> NetfilterMessage {
    // NFNETLINK_V0 is a u32 in libc; the header field is its one byte.
    let version = u8::try_from(NFNETLINK_V0).unwrap_or_default();
    NetfilterMessage::new(
        NetfilterHeader::new(family, version, 0),
        NfTablesMessage::GetTable(TableMessage {
            attributes: Vec::new(),
        }),
    )
}

/// The table an answer of the dump describes, if it is one.
fn table(m: NetfilterMessage) -> Option<Table> {
    let NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(t)) = m.inner else {
        return None;
    };
    let name = t.attributes.into_iter().find_map(|a| match a {
        TableAttribute::Name(n) => Some(n),
        _ => None,
    })?;
    Some(Table {
        family: m.header.family,
        name,
    })
}

/// The nf_tables tables of `family` (`None`: of every family) in this thread's namespace.
pub fn list(family: Option<Family>) -> anyhow::Result<Vec<Table>> {
    let proto = family.map_or(NetfilterProtoFamily::Unspec, nfproto);
    let mut nl = Socket::netfilter()?;
    let answers = nl
        .dump(request(proto))
        .map_err(|e| anyhow!("listing nf_tables tables: {e}"))?;
    Ok(answers.into_iter().filter_map(table).collect())
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};

    use super::super::{DUMP, encode, split};
    use super::*;

    #[test]
    fn the_dump_request_names_the_family_and_nothing_else() {
        let mut buf = Vec::new();
        encode(&mut buf, request(nfproto(Family::V6)), DUMP, 5);
        // Header and struct nfgenmsg: no attribute.
        assert_eq!(buf.len(), 16 + 4);
        assert_eq!(buf[16], u8::from(NetfilterProtoFamily::IPv6));
        let parts = split(&buf).unwrap();
        assert_eq!((parts[0].0.sequence_number, parts[0].0.flags), (5, DUMP));
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(parts[0].1).unwrap();
        assert!(matches!(
            back.payload,
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::GetTable(_)),
                ..
            })
        ));
    }

    #[test]
    fn an_answer_gives_the_family_and_name() {
        let answer = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Use(3),
                    TableAttribute::Name("istio-proxy-nat".into()),
                ],
            }),
        );
        // Through the wire format, as the kernel's answer arrives.
        let mut buf = Vec::new();
        encode(&mut buf, answer, 0, 1);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(m) = back.payload else {
            panic!("not a netfilter message: {back:?}");
        };
        assert_eq!(
            table(m),
            Some(Table {
                family: NetfilterProtoFamily::Inet,
                name: "istio-proxy-nat".into(),
            })
        );
        assert_eq!(table(request(NetfilterProtoFamily::IPv4)), None);
    }
}
