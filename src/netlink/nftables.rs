//! nf_tables over netlink: a [`Transaction`] encoded as `nft` encodes the same commands, in one
//! batch (`BATCH_BEGIN` … `BATCH_END`, one kernel transaction across all its tables), sent in
//! one `send` on a `NETLINK_NETFILTER` socket of the current network namespace. Needs only
//! `CAP_NET_ADMIN`.
//!
//! [`encode`] is pure; [`send`] is the effect. Messages and the expressions the crate types
//! (meta, cmp, payload, bitwise, immediate, lookup) go through netlink-packet-netfilter; the
//! expressions it lacks (`counter`, `ct`, `redir`, `tproxy`, `range`) through its raw-attribute
//! expression variant, with their attribute numbers named in [`raw`].
//!
//! Encoding copies nft 1.0's, expression by expression and attribute by attribute, so that
//! `nft list ruleset` and `nft --debug=netlink list ruleset` show the same as after `nft -f` of
//! [`nft::render`]'s text. The batch is byte for byte nft's (checked while developing by
//! decoding nft's `sendmsg` under strace for all 28 goldens and the range cases of the tests),
//! except that its last message asks for an acknowledgement (`NLM_F_ACK`), so that [`send`]
//! knows the kernel took the whole batch.

use netlink_packet_core::{
    DefaultNla, Emitable, ErrorBuffer, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, NetlinkBuffer, Nla,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook as HookAttr, HookNumber, Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey,
    NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute,
    SetDescription, SetElementAttribute, SetElementFlags, SetElementList, SetElementMessage,
    SetFlags, SetMessage, TableAttribute, TableFlags, TableMessage, Verdict as NlVerdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterProtoFamily, NetfilterSubsystem};

use super::Message;
use super::tables::nfproto;
use crate::nft::{
    self, BaseChain, ChainType, Dir, Family, Hook, L4, Op, PortSet, Stmt, Transaction, Verdict,
};

/// Numbers the crate does not name, all from the kernel's
/// `include/uapi/linux/netfilter/nf_tables.h` (and nft's own user-data layout for sets), kept
/// here so every raw attribute is in one place.
pub mod raw {
    // Expressions without a typed variant in netlink-packet-netfilter 0.4: `enum nft_ct_attributes`,
    // `nft_redir_attributes`, `nft_tproxy_attributes`, `nft_range_attributes`.
    pub const NFTA_CT_DREG: u16 = 1;
    pub const NFTA_CT_KEY: u16 = 2;
    pub const NFTA_CT_SREG: u16 = 4;
    /// `enum nft_ct_keys`
    pub const NFT_CT_STATE: u32 = 0;
    pub const NFT_CT_MARK: u32 = 3;
    pub const NFT_CT_ZONE: u32 = 17;
    pub const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
    pub const NFTA_REDIR_FLAGS: u16 = 3;
    /// `NF_NAT_RANGE_PROTO_SPECIFIED` (linux/netfilter/nf_nat.h): the port register is set.
    pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
    pub const NFTA_TPROXY_FAMILY: u16 = 1;
    pub const NFTA_TPROXY_REG_PORT: u16 = 3;
    pub const NFTA_RANGE_SREG: u16 = 1;
    pub const NFTA_RANGE_OP: u16 = 2;
    pub const NFTA_RANGE_FROM_DATA: u16 = 3;
    pub const NFTA_RANGE_TO_DATA: u16 = 4;
    /// `enum nft_range_ops`: NFT_RANGE_NEQ (nft writes `!= a-b` with it, `a-b` as two cmps).
    pub const NFT_RANGE_NEQ: u32 = 1;
    // Values the crate's typed attributes take as plain numbers.
    /// `enum nft_payload_bases`
    pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
    /// `NFT_LOOKUP_F_INV`
    pub const NFT_LOOKUP_F_INV: u32 = 1;
    /// Netfilter verdicts (`NF_DROP`, `NF_ACCEPT`); the crate names only nf_tables' own.
    pub const NF_DROP: u32 = 0;
    pub const NF_ACCEPT: u32 = 1;
    /// `IPPROTO_TCP`, `IPPROTO_UDP`
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    /// `IFNAMSIZ`: nft compares interface names as 16 zero-padded bytes.
    pub const IFNAMSIZ: usize = 16;
    // nft's description of an anonymous port set (kernel-opaque, read back by `nft list`):
    // the key's data type (`TYPE_INET_SERVICE`) and the NFTNL_UDATA_SET_* user data: key byte
    // order big endian, auto-merge (interval sets), and the key's `typeof` (a payload
    // expression: protocol description id, field id).
    pub const TYPE_INET_SERVICE: u32 = 13;
    pub const UDATA_SET_KEYBYTEORDER: u8 = 0;
    pub const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
    pub const UDATA_SET_KEY_TYPEOF: u8 = 3;
    pub const UDATA_TYPEOF_EXPR: u8 = 0;
    pub const UDATA_TYPEOF_DATA: u8 = 1;
    pub const BYTEORDER_BIG_ENDIAN: u32 = 2;
    pub const EXPR_PAYLOAD: u32 = 7;
    pub const PROTO_DESC_UDP: u32 = 6;
    pub const PROTO_DESC_TCP: u32 = 8;
    pub const PORT_FIELD_SPORT: u32 = 1;
    pub const PORT_FIELD_DPORT: u32 = 2;
    /// NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN: an interval up to 65535.
    pub const UDATA_SET_ELEM_FLAGS: u8 = 1;
    pub const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
    /// The name nft gives an anonymous set; the kernel picks the number.
    pub const ANON_SET_NAME: &str = "__set%d";
}

/// An encoded transaction: the bytes of one batch, and which op each message belongs to.
#[derive(Debug, Clone)]
pub struct Batch {
    bytes: Vec<u8>,
    /// (sequence number, op index) of every message between begin and end.
    seqs: Vec<(u32, usize)>,
    begin_seq: u32,
}

impl Batch {
    /// The whole batch, begin to end.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Messages between `BATCH_BEGIN` and `BATCH_END`.
    pub fn messages(&self) -> usize {
        self.seqs.len()
    }

    /// The op a message belongs to.
    pub fn op_of(&self, seq: u32) -> Option<usize> {
        self.seqs.iter().find(|(s, _)| *s == seq).map(|&(_, op)| op)
    }
}

type Expr = ListAttribute<ExpressionAttribute>;

/// Encodes a transaction as one batch. An invalid op (see [`nft::validate`]) fails the whole
/// encoding, with the error `validate` would give: each op's names are checked, then its
/// statements made explicit, as it is encoded.
pub fn encode(tx: &Transaction) -> Result<Batch, nft::Invalid> {
    let mut enc = Encoder {
        bytes: Vec::with_capacity(256 + 256 * tx.ops.len()),
        seqs: Vec::with_capacity(tx.ops.len() + 4),
        seq: 1,
        set_id: 0,
        last_offset: None,
    };
    let begin_seq = enc.seq;
    enc.control(ControlMessage::BatchBegin);
    for (i, op) in tx.ops.iter().enumerate() {
        enc.op(i, op).map_err(|reason| nft::Invalid {
            op: i,
            text: nft::render_op(op),
            reason,
        })?;
    }
    // Only the last message asks for an acknowledgement (errors are always reported): the
    // kernel sends the answers after processing the whole batch, so that one acknowledgement
    // confirms it, and thousands of answers cannot overflow the socket's receive buffer.
    if let Some(off) = enc.last_offset {
        let mut m = NetlinkBuffer::new(&mut enc.bytes[off..]);
        let flags = m.flags();
        m.set_flags(flags | NLM_F_ACK);
    }
    enc.control(ControlMessage::BatchEnd);
    Ok(Batch {
        bytes: enc.bytes,
        seqs: enc.seqs,
        begin_seq,
    })
}

struct Encoder {
    bytes: Vec<u8>,
    seqs: Vec<(u32, usize)>,
    seq: u32,
    set_id: u32,
    /// Where the last nf_tables message starts in `bytes`.
    last_offset: Option<usize>,
}

impl Encoder {
    /// Appends one message: `body` after the nfnetlink header (`family`, `res_id`).
    fn put<B: Emitable>(
        &mut self,
        kind: u16,
        family: NetfilterProtoFamily,
        res_id: u16,
        body: B,
        flags: u16,
    ) {
        let header = NetfilterHeader::new(family, 0, res_id);
        let msg = Message {
            kind,
            body: Nf { header, body },
        };
        super::encode(&mut self.bytes, msg, flags, self.seq);
        self.seq += 1;
    }

    fn control(&mut self, c: ControlMessage) {
        // Subsystem 0 (the nfnetlink core); the batch names the subsystem it carries in the
        // res_id field.
        let kind = u16::from(u8::from(c.message_type()));
        let subsys = u16::from(u8::from(NetfilterSubsystem::NfTables));
        self.put(kind, NetfilterProtoFamily::Unspec, subsys, c, NLM_F_REQUEST);
    }

    /// One nf_tables message of op `op`, on this backend's `inet` tables.
    fn nft(&mut self, op: usize, m: NfTablesMessage, flags: u16) {
        self.nft_in(op, NetfilterProtoFamily::Inet, m, flags);
    }

    /// One nf_tables message of op `op`, on a table of `family`.
    fn nft_in(&mut self, op: usize, family: NetfilterProtoFamily, m: NfTablesMessage, flags: u16) {
        let subsys = u16::from(u8::from(NetfilterSubsystem::NfTables));
        let kind = subsys << 8 | u16::from(u8::from(m.message_type()));
        self.seqs.push((self.seq, op));
        self.last_offset = Some(self.bytes.len());
        let flags = NLM_F_REQUEST | flags;
        self.put(kind, family, 0, m, flags);
    }

    fn new_table(&mut self, op: usize, name: &str) {
        let attributes = vec![
            TableAttribute::Name(name.to_owned()),
            TableAttribute::Flags(TableFlags::empty()),
        ];
        self.nft(
            op,
            NfTablesMessage::NewTable(TableMessage { attributes }),
            0,
        );
    }

    fn op(&mut self, i: usize, op: &Op) -> Result<(), nft::Reason> {
        nft::check_names(op)?;
        match op {
            Op::DeleteTable(t) => {
                self.new_table(i, t);
                let attributes = vec![TableAttribute::Name(t.clone())];
                self.nft(
                    i,
                    NfTablesMessage::DeleteTable(TableMessage { attributes }),
                    0,
                );
            }
            Op::AddTable(t) => self.new_table(i, t),
            Op::AddChain(c) => {
                let mut attributes = vec![
                    ChainAttribute::Table(c.table.clone()),
                    ChainAttribute::Name(c.name.clone()),
                ];
                if let Some(b) = &c.base {
                    attributes.extend(base_chain(b));
                }
                self.nft(
                    i,
                    NfTablesMessage::NewChain(ChainMessage { attributes }),
                    NLM_F_CREATE,
                );
            }
            Op::AddRule(r) => {
                let stmts = nft::explicit(&r.stmts)?;
                // The expressions list: its elements as bytes, one statement after another.
                let mut list = Vec::with_capacity(64 * stmts.len());
                for s in &stmts {
                    self.stmt_elements(i, &r.table, s, &mut list);
                }
                let expressions = RuleAttribute::Expressions(Vec::new());
                let attributes = vec![
                    RuleAttribute::Table(r.table.clone()),
                    RuleAttribute::Chain(r.chain.clone()),
                    RuleAttribute::Other(DefaultNla::new(kind_of(&expressions), list)),
                ];
                self.nft(
                    i,
                    NfTablesMessage::NewRule(RuleMessage { attributes }),
                    NLM_F_CREATE | NLM_F_APPEND,
                );
            }
            // As nft encodes `delete rule … handle N` and `flush chain …` (a DELRULE without
            // a handle deletes every rule of the chain) and `delete chain …`.
            Op::DeleteRule(c, _) | Op::FlushChain(c) => {
                let mut attributes = vec![
                    RuleAttribute::Table(c.table.clone()),
                    RuleAttribute::Chain(c.chain.clone()),
                ];
                if let Op::DeleteRule(_, handle) = op {
                    attributes.push(RuleAttribute::Handle(*handle));
                }
                let m = NfTablesMessage::DeleteRule(RuleMessage { attributes });
                self.nft_in(i, nfproto(c.family), m, 0);
            }
            Op::DeleteChain(c) => {
                let attributes = vec![
                    ChainAttribute::Table(c.table.clone()),
                    ChainAttribute::Name(c.chain.clone()),
                ];
                let m = NfTablesMessage::DeleteChain(ChainMessage { attributes });
                self.nft_in(i, nfproto(c.family), m, 0);
            }
        }
        Ok(())
    }

    /// Appends to `list` the expressions of statement `s` as the elements of a rule's
    /// expression list, each written out once (see [`emitted`]).
    fn stmt_elements(&mut self, op: usize, table: &str, s: &Stmt, list: &mut Vec<u8>) {
        let mut exprs = Vec::with_capacity(3);
        self.stmt(op, table, s, &mut exprs);
        for e in &exprs {
            let element = ListAttribute::<ExpressionAttribute>::Other(emitted(e));
            let at = list.len();
            list.resize(at + element.buffer_len(), 0);
            element.emit(&mut list[at..]);
        }
    }

    /// The expressions of one statement (dependencies already explicit); anonymous sets are
    /// emitted as their own messages before the rule, as nft does.
    fn stmt(&mut self, op: usize, table: &str, s: &Stmt, out: &mut Vec<Expr>) {
        match s {
            Stmt::L4Proto(p) => {
                out.extend(meta_cmp(MetaKey::L4Proto, false, vec![proto_number(*p)]))
            }
            Stmt::NfProto(f) => {
                out.extend(meta_cmp(MetaKey::Nfproto, false, vec![nfproto_byte(*f)]))
            }
            Stmt::Port {
                proto,
                dir,
                negate,
                ports,
            } => self.port_match(op, table, (*proto, *dir), *negate, ports, out),
            Stmt::Iifname(n) => out.extend(meta_cmp(MetaKey::Iifname, false, ifname_bytes(n))),
            Stmt::Oifname(n) => out.extend(meta_cmp(MetaKey::Oifname, false, ifname_bytes(n))),
            Stmt::Addr { dir, negate, net } => addr_match(*dir, *negate, net, out),
            Stmt::SkUid { negate, id } => {
                out.extend(meta_cmp(
                    MetaKey::SocketUserId,
                    *negate,
                    id.to_ne_bytes().to_vec(),
                ));
            }
            Stmt::SkGid { negate, id } => {
                out.extend(meta_cmp(
                    MetaKey::SocketGroupId,
                    *negate,
                    id.to_ne_bytes().to_vec(),
                ));
            }
            Stmt::Mark { negate, value } => {
                out.extend(meta_cmp(
                    MetaKey::Mark,
                    *negate,
                    value.to_ne_bytes().to_vec(),
                ));
            }
            Stmt::CtMark(v) => out.extend([
                ct_load(raw::NFT_CT_MARK),
                cmp(Operator::Equal, v.to_ne_bytes().to_vec()),
            ]),
            Stmt::CtState(st) => out.extend([
                ct_load(raw::NFT_CT_STATE),
                bitwise(st.bits().to_ne_bytes().to_vec()),
                cmp(Operator::NotEqual, vec![0; 4]),
            ]),
            Stmt::Counter => out.push(raw_expr("counter", vec![])),
            Stmt::SetMark(v) => {
                out.extend([immediate(v.to_ne_bytes().to_vec()), meta_set(MetaKey::Mark)]);
            }
            Stmt::SetMarkFromCt => {
                out.extend([ct_load(raw::NFT_CT_MARK), meta_set(MetaKey::Mark)]);
            }
            Stmt::SetCtMarkFromMark => {
                out.extend([meta_load(MetaKey::Mark), ct_set(raw::NFT_CT_MARK)]);
            }
            Stmt::SetCtZone(z) => {
                out.extend([
                    immediate(z.to_ne_bytes().to_vec()),
                    ct_set(raw::NFT_CT_ZONE),
                ]);
            }
            Stmt::Redirect(p) => out.extend(redirect(*p)),
            Stmt::Tproxy { family, port } => out.extend(tproxy(*family, *port)),
            Stmt::Verdict(v) => out.push(verdict(v)),
        }
    }

    /// A port match: the port loaded from the transport header, compared with one port or
    /// a range, or looked up in an anonymous set (emitted before the rule).
    fn port_match(
        &mut self,
        op: usize,
        table: &str,
        (proto, dir): (L4, Dir),
        negate: bool,
        ports: &[nft::PortRange],
        out: &mut Vec<Expr>,
    ) {
        let offset = match dir {
            Dir::Src => 0,
            Dir::Dst => 2,
        };
        out.push(payload(raw::NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2));
        match nft::PortSet::of(ports) {
            PortSet::One(p) => out.push(cmp(op_of(negate), p.to_be_bytes().to_vec())),
            PortSet::Range(a, b) if !negate => {
                out.push(cmp(Operator::GreatherThanEqual, a.to_be_bytes().to_vec()));
                out.push(cmp(Operator::LessThanEqual, b.to_be_bytes().to_vec()));
            }
            PortSet::Range(a, b) => out.push(range_neq(a, b)),
            set => {
                let id = self.port_set(op, table, proto, dir, &set);
                let mut l = vec![
                    Lookup::SourceRegister(Register::Reg1),
                    Lookup::Set(raw::ANON_SET_NAME.to_owned()),
                    Lookup::SetId(id),
                ];
                if negate {
                    l.push(Lookup::Flags(raw::NFT_LOOKUP_F_INV));
                }
                out.push(Expressions::Lookup(l).into());
            }
        }
    }

    /// An anonymous constant port set and its elements (two messages of op `op`); returns
    /// its id in the batch.
    fn port_set(&mut self, op: usize, table: &str, proto: L4, dir: Dir, set: &PortSet) -> u32 {
        self.set_id += 1;
        let id = self.set_id;
        let (elems, interval) = set_elements(set);
        let mut flags = SetFlags::Anonymous | SetFlags::Constant;
        if interval {
            flags |= SetFlags::Interval;
        }
        let attributes = vec![
            SetAttribute::Table(table.to_owned()),
            SetAttribute::Name(raw::ANON_SET_NAME.to_owned()),
            SetAttribute::Flags(flags),
            SetAttribute::KeyType(raw::TYPE_INET_SERVICE),
            SetAttribute::KeyLen(2),
            SetAttribute::Id(id),
            // nft counts an interval open to 65535 as two elements, though it sends one.
            SetAttribute::Description(vec![SetDescription::Size(
                (elems.len() + usize::from(elems.last().is_some_and(|e| e.open))) as u32,
            )]),
            SetAttribute::UserData(set_udata(proto, dir, interval)),
        ];
        self.nft(
            op,
            NfTablesMessage::NewSet(SetMessage { attributes }),
            NLM_F_CREATE,
        );
        let attributes = vec![
            SetElementList::Table(table.to_owned()),
            SetElementList::Set(raw::ANON_SET_NAME.to_owned()),
            SetElementList::SetId(id),
            SetElementList::Elements(elems.iter().enumerate().map(set_element).collect()),
        ];
        self.nft(
            op,
            NfTablesMessage::NewSetElement(SetElementMessage { attributes }),
            NLM_F_CREATE,
        );
        id
    }
}

/// A meta key loaded and compared (`!=` when `negate`) with `value`.
fn meta_cmp(key: MetaKey, negate: bool, value: Vec<u8>) -> [Expr; 2] {
    [meta_load(key), cmp(op_of(negate), value)]
}

/// An interface name as the kernel compares it: padded with zeros to `IFNAMSIZ`.
fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(raw::IFNAMSIZ, 0);
    bytes
}

/// An address match. As nft: a prefix on a byte boundary loads only its bytes; any other
/// (and /0) loads the whole address and masks it.
fn addr_match(dir: Dir, negate: bool, net: &ipnet::IpNet, out: &mut Vec<Expr>) {
    let (offset, octets) = match (net.network(), dir) {
        (std::net::IpAddr::V4(a), Dir::Src) => (12, a.octets().to_vec()),
        (std::net::IpAddr::V4(a), Dir::Dst) => (16, a.octets().to_vec()),
        (std::net::IpAddr::V6(a), Dir::Src) => (8, a.octets().to_vec()),
        (std::net::IpAddr::V6(a), Dir::Dst) => (24, a.octets().to_vec()),
    };
    let prefix = usize::from(net.prefix_len());
    if prefix > 0 && prefix % 8 == 0 {
        let n = prefix / 8;
        out.push(payload(raw::NFT_PAYLOAD_NETWORK_HEADER, offset, n as u32));
        out.push(cmp(op_of(negate), octets[..n].to_vec()));
    } else {
        let len = octets.len();
        out.push(payload(raw::NFT_PAYLOAD_NETWORK_HEADER, offset, len as u32));
        out.push(bitwise(prefix_mask(prefix, len)));
        out.push(cmp(op_of(negate), octets));
    }
}

/// `redirect to :PORT`.
fn redirect(port: u16) -> [Expr; 2] {
    [
        immediate(port.to_be_bytes().to_vec()),
        raw_expr(
            "redir",
            vec![
                u32_nla(raw::NFTA_REDIR_REG_PROTO_MIN, Register::Reg1.into()),
                u32_nla(raw::NFTA_REDIR_FLAGS, raw::NF_NAT_RANGE_PROTO_SPECIFIED),
            ],
        ),
    ]
}

/// `tproxy ip|ip6 to :PORT`.
fn tproxy(family: Family, port: u16) -> [Expr; 2] {
    [
        immediate(port.to_be_bytes().to_vec()),
        raw_expr(
            "tproxy",
            vec![
                u32_nla(raw::NFTA_TPROXY_FAMILY, u32::from(nfproto_byte(family))),
                u32_nla(raw::NFTA_TPROXY_REG_PORT, Register::Reg1.into()),
            ],
        ),
    ]
}

/// A verdict: an immediate into the verdict register.
fn verdict(v: &Verdict) -> Expr {
    let mut attrs = vec![VerdictAttribute::Code(match v {
        Verdict::Accept => NlVerdict::Other(raw::NF_ACCEPT),
        Verdict::Drop => NlVerdict::Other(raw::NF_DROP),
        Verdict::Return => NlVerdict::Return,
        Verdict::Jump(_) => NlVerdict::Jump,
    })];
    if let Verdict::Jump(c) = v {
        attrs.push(VerdictAttribute::Chain(c.clone()));
    }
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(attrs)),
    ])
    .into()
}

/// One element of an anonymous port set, as nft sends it.
struct SetElem {
    key: u16,
    /// The element ends an interval (the first port after it).
    end: bool,
    /// The interval it starts is open to 65535 (no end element follows).
    open: bool,
}

/// The elements of a port set, and whether it is an interval set.
fn set_elements(set: &PortSet) -> (Vec<SetElem>, bool) {
    let elem = |key, end, open| SetElem { key, end, open };
    let mut elems = Vec::new();
    let interval = match set {
        PortSet::Ports(v) => {
            elems.extend(v.iter().map(|&p| elem(p, false, false)));
            false
        }
        PortSet::Intervals(v) => {
            if v.first().is_some_and(|&(a, _)| a != 0) {
                elems.push(elem(0, true, false));
            }
            for &(a, b) in v {
                elems.push(elem(a, false, b == u16::MAX));
                if b != u16::MAX {
                    elems.push(elem(b + 1, true, false));
                }
            }
            true
        }
        PortSet::One(_) | PortSet::Range(..) => unreachable!("single values are not sets"),
    };
    (elems, interval)
}

/// The `i`th (from 0) element of a set's element list.
fn set_element((i, el): (usize, &SetElem)) -> ListAttribute<SetElementAttribute> {
    let mut e = Vec::with_capacity(3);
    if el.end {
        e.push(SetElementAttribute::Flags(SetElementFlags::IntervalEnd));
    }
    e.push(SetElementAttribute::Key(DataAttribute::Value(
        el.key.to_be_bytes().to_vec(),
    )));
    if el.open {
        let mut u = vec![raw::UDATA_SET_ELEM_FLAGS, 4];
        u.extend(raw::SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
        e.push(SetElementAttribute::UserData(u));
    }
    // nft numbers the nest of each element 1, 2, 3… (the kernel ignores the number; the
    // crate's `ListAttribute::Element` always writes 1).
    let mut body = vec![0; e.as_slice().buffer_len()];
    e.as_slice().emit(&mut body);
    ListAttribute::Other(DefaultNla::new((i + 1) as u16 | NLA_F_NESTED, body))
}

fn base_chain(b: &BaseChain) -> [ChainAttribute; 2] {
    let kind = match b.kind {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
        ChainType::Route => "route",
    };
    let hook = match b.hook {
        Hook::Prerouting => InetHookNumber::PreRouting,
        Hook::Input => InetHookNumber::LocalIn,
        Hook::Forward => InetHookNumber::Forward,
        Hook::Output => InetHookNumber::LocalOut,
        Hook::Postrouting => InetHookNumber::PostRouting,
    };
    [
        ChainAttribute::Type(kind.to_owned()),
        ChainAttribute::Hook(vec![
            HookAttr::Number(HookNumber::Inet(hook)),
            // The kernel reads the priority as a signed 32-bit number.
            HookAttr::Priority(b.priority as u32),
        ]),
    ]
}

/// nft's user data of an anonymous port set (see [`raw`]).
fn set_udata(proto: L4, dir: Dir, interval: bool) -> Vec<u8> {
    fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
        out.push(kind);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    }
    let mut u = Vec::with_capacity(32);
    tlv(
        &mut u,
        raw::UDATA_SET_KEYBYTEORDER,
        &raw::BYTEORDER_BIG_ENDIAN.to_ne_bytes(),
    );
    if interval {
        tlv(&mut u, raw::UDATA_SET_MERGE_ELEMENTS, &1u32.to_ne_bytes());
    }
    let desc = match proto {
        L4::Tcp => raw::PROTO_DESC_TCP,
        L4::Udp => raw::PROTO_DESC_UDP,
    };
    let field = match dir {
        Dir::Src => raw::PORT_FIELD_SPORT,
        Dir::Dst => raw::PORT_FIELD_DPORT,
    };
    let mut data = Vec::with_capacity(12);
    tlv(&mut data, 0, &desc.to_ne_bytes());
    tlv(&mut data, 1, &field.to_ne_bytes());
    let mut typeof_ = Vec::with_capacity(20);
    tlv(
        &mut typeof_,
        raw::UDATA_TYPEOF_EXPR,
        &raw::EXPR_PAYLOAD.to_ne_bytes(),
    );
    tlv(&mut typeof_, raw::UDATA_TYPEOF_DATA, &data);
    tlv(&mut u, raw::UDATA_SET_KEY_TYPEOF, &typeof_);
    u
}

fn prefix_mask(prefix: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = prefix.saturating_sub(i * 8).min(8);
            if bits == 0 { 0 } else { 0xffu8 << (8 - bits) }
        })
        .collect()
}

fn proto_number(p: L4) -> u8 {
    match p {
        L4::Tcp => raw::IPPROTO_TCP,
        L4::Udp => raw::IPPROTO_UDP,
    }
}

/// [`nfproto`] as the byte a `meta nfproto` comparison or a TPROXY family attribute holds.
fn nfproto_byte(f: Family) -> u8 {
    u8::from(nfproto(f))
}

fn op_of(negate: bool) -> Operator {
    if negate {
        Operator::NotEqual
    } else {
        Operator::Equal
    }
}

fn meta_load(key: MetaKey) -> Expr {
    Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ])
    .into()
}

fn meta_set(key: MetaKey) -> Expr {
    Expressions::Meta(vec![Meta::Key(key), Meta::SourceRegister(Register::Reg1)]).into()
}

fn cmp(op: Operator, data: Vec<u8>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
    .into()
}

fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

fn bitwise(mask: Vec<u8>) -> Expr {
    let len = mask.len();
    Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::Reg1),
        Bitwise::DestinationRegister(Register::Reg1),
        Bitwise::Length(len as u32),
        Bitwise::Mask(DataAttribute::Value(mask)),
        Bitwise::Xor(DataAttribute::Value(vec![0; len])),
    ])
    .into()
}

fn immediate(data: Vec<u8>) -> Expr {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Reg1),
        Immediate::Data(DataAttribute::Value(data)),
    ])
    .into()
}

fn raw_expr(name: &str, attributes: Vec<DefaultNla>) -> Expr {
    Expressions::Other {
        expression_type: name.to_owned(),
        attributes,
    }
    .into()
}

/// An attribute written out once, kept as its bytes (kind and flags included). The crate's
/// nested attributes measure themselves by walking their whole subtree, several times at every
/// level of the message, so a rule's expressions as the crate types them cost time in
/// proportion to their size times their depth (it was a third of this process's own CPU time
/// on a pod start); as bytes they are measured and copied in constant time.
fn emitted<N: Nla>(nla: &N) -> DefaultNla {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    DefaultNla::new(kind_of(nla), value)
}

/// The type field the crate writes for `nla`: its kind with its flags.
fn kind_of<N: Nla>(nla: &N) -> u16 {
    let mut kind = nla.kind();
    if nla.is_nested() {
        kind |= NLA_F_NESTED;
    }
    if nla.is_network_byteorder() {
        kind |= NLA_F_NET_BYTEORDER;
    }
    kind
}

fn u32_nla(kind: u16, value: u32) -> DefaultNla {
    DefaultNla::new(kind, value.to_be_bytes().to_vec())
}

/// A nested `NFTA_DATA_VALUE` attribute, as the crate emits it, inside a raw attribute.
fn data_nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    let d = DataAttribute::Value(value);
    let mut buf = vec![0; d.buffer_len()];
    d.emit(&mut buf);
    DefaultNla::new(kind | NLA_F_NESTED, buf)
}

/// `ct load KEY => reg 1` (`reg` = NFTA_CT_DREG) or `ct set KEY with reg 1` (NFTA_CT_SREG).
fn ct(key: u32, reg: u16) -> Expr {
    raw_expr(
        "ct",
        vec![
            u32_nla(raw::NFTA_CT_KEY, key),
            u32_nla(reg, Register::Reg1.into()),
        ],
    )
}

fn ct_load(key: u32) -> Expr {
    ct(key, raw::NFTA_CT_DREG)
}

fn ct_set(key: u32) -> Expr {
    ct(key, raw::NFTA_CT_SREG)
}

fn range_neq(first: u16, last: u16) -> Expr {
    raw_expr(
        "range",
        vec![
            u32_nla(raw::NFTA_RANGE_SREG, Register::Reg1.into()),
            u32_nla(raw::NFTA_RANGE_OP, raw::NFT_RANGE_NEQ),
            data_nla(raw::NFTA_RANGE_FROM_DATA, first.to_be_bytes().to_vec()),
            data_nla(raw::NFTA_RANGE_TO_DATA, last.to_be_bytes().to_vec()),
        ],
    )
}

/// The code of an `NLMSG_ERROR` answer (0 for an acknowledgement), `None` if truncated.
fn error_code(bytes: &[u8]) -> Option<i32> {
    let payload = NetlinkBuffer::new_checked(bytes).ok()?.payload();
    let code = ErrorBuffer::new_checked(payload).ok()?.code();
    Some(code.map_or(0, |c| c.get()))
}

/// An nfnetlink message body: the nfnetlink header, then one of the crate's message bodies
/// (whose `emit` writes only their attributes). Sent as [`Message`], not as the crate's
/// all-kinds `NetfilterMessage`, so that only the nf_tables encoders land in the binary (see
/// `netlink/mod.rs`).
#[derive(Debug, Clone)]
struct Nf<B> {
    header: NetfilterHeader,
    body: B,
}

impl<B: Emitable> Emitable for Nf<B> {
    fn buffer_len(&self) -> usize {
        self.header.buffer_len() + self.body.buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.header.emit(buffer);
        self.body.emit(&mut buffer[self.header.buffer_len()..]);
    }
}

/// Why a transaction was not applied. In every case nothing of it was.
#[derive(Debug)]
pub enum ApplyError {
    /// Refused before sending (see [`nft::validate`]).
    Invalid(nft::Invalid),
    /// The netlink socket failed (`what` says at which step).
    Socket {
        what: &'static str,
        error: std::io::Error,
    },
    /// The kernel refused the transaction.
    Refused(Refused),
    /// No answer to the last message: the outcome is unknown (`overflow`: answers were lost
    /// to a full receive buffer).
    Unconfirmed { overflow: bool },
}

/// The kernel's refusal: the first message it refused, mapped back to its op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Index of the op in [`Transaction::ops`]; `None` when the kernel refused the batch as a
    /// whole (no `CAP_NET_ADMIN`, or the commit failed).
    pub op: Option<usize>,
    /// The op in nft syntax.
    pub text: Option<String>,
    pub errno: nix::errno::Errno,
    /// The kernel features the op relies on ([`nft::kernel_features`]).
    pub features: Vec<&'static str>,
    /// How many other messages the kernel refused (often consequences of the first).
    pub others: usize,
    /// Whether more refusals were lost to a full receive buffer.
    pub lost: bool,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Invalid(e) => write!(f, "{e}"),
            ApplyError::Socket { what, error } => {
                write!(f, "nf_tables netlink socket: {what}: {error}")
            }
            ApplyError::Refused(r) => {
                let reason = format!("{} ({})", r.errno.desc(), r.errno);
                match &r.text {
                    // One line: a table's delete is written as two commands.
                    Some(text) => write!(
                        f,
                        "the kernel refused `{}`: {reason}",
                        text.replace('\n', "; ")
                    )?,
                    None => write!(f, "the kernel refused the nf_tables transaction: {reason}")?,
                }
                if r.errno == nix::errno::Errno::EPERM && r.op.is_none() {
                    write!(f, "; CAP_NET_ADMIN is needed in the network namespace")?;
                } else if r.errno == nix::errno::Errno::EPERM {
                    write!(
                        f,
                        "; the kernel refuses this without CAP_NET_ADMIN, and to anyone but the \
                         owner of a table created with `flags owner` (another process holds it)"
                    )?;
                } else if !r.features.is_empty() {
                    write!(
                        f,
                        "; check the kernel has nf_tables inet with {}",
                        r.features.join(", ")
                    )?;
                }
                if r.others > 0 || r.lost {
                    let more = if r.lost { " or more" } else { "" };
                    write!(f, " ({}{more} more messages refused)", r.others)?;
                }
                write!(f, "; nothing was applied")
            }
            ApplyError::Unconfirmed { overflow } => write!(
                f,
                "the kernel did not acknowledge the nf_tables transaction{}; its outcome is \
                 unknown",
                if *overflow {
                    " (answers lost: receive buffer full)"
                } else {
                    ""
                }
            ),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Encodes and sends a transaction: [`encode`] then [`send`].
pub fn apply(tx: &Transaction) -> Result<(), ApplyError> {
    let batch = encode(tx).map_err(ApplyError::Invalid)?;
    send(tx, &batch)
}

/// Sends a batch in one `send` on a fresh `NETLINK_NETFILTER` socket of the calling thread's
/// network namespace and reads every answer: the errors, and the acknowledgement of the last
/// message. The kernel processes the whole batch inside the `send`, so the answers are all
/// queued when it returns; one error anywhere means the kernel applied nothing. `tx` is the transaction the batch was encoded from (to name a refused op).
pub fn send(tx: &Transaction, batch: &Batch) -> Result<(), ApplyError> {
    let mut s = send_batch(batch)?;
    let last_seq = batch.seqs.last().map(|&(seq, _)| seq);
    let mut answers = read_answers(&mut s, last_seq)?;
    answers.errors.sort_unstable();
    if let Some(&(seq, errno)) = answers.errors.first() {
        let op = if seq == batch.begin_seq {
            None
        } else {
            batch.op_of(seq)
        };
        let op_ref = op.and_then(|i| tx.ops.get(i));
        return Err(ApplyError::Refused(Refused {
            op,
            text: op_ref.map(nft::render_op),
            errno: nix::errno::Errno::from_raw(errno),
            features: op_ref.map(nft::kernel_features).unwrap_or_default(),
            others: answers.errors.len() - 1,
            lost: answers.overflow,
        }));
    }
    if last_seq.is_some() && !answers.acked {
        return Err(ApplyError::Unconfirmed {
            overflow: answers.overflow,
        });
    }
    Ok(())
}

/// A netfilter netlink socket, the batch sent on it, ready (non-blocking) for the answers.
fn send_batch(batch: &Batch) -> Result<netlink_sys::Socket, ApplyError> {
    use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
    let sock = |what| move |error| ApplyError::Socket { what, error };
    let mut s = Socket::new(NETLINK_NETFILTER).map_err(sock("socket"))?;
    s.bind_auto().map_err(sock("bind"))?;
    // Answers carry only the header of the message they answer.
    s.set_cap_ack(true).map_err(sock("NETLINK_CAP_ACK"))?;
    // A netlink message must fit the socket's send buffer (about 200 KiB by default); a
    // larger batch gets a buffer its size (forced: CAP_NET_ADMIN is needed anyway).
    if batch.bytes().len() > 128 * 1024 {
        use nix::sys::socket::{setsockopt, sockopt::SndBufForce};
        setsockopt(&s, SndBufForce, &batch.bytes().len()).map_err(|e| ApplyError::Socket {
            what: "SO_SNDBUFFORCE",
            error: e.into(),
        })?;
    }
    let n = s.send(batch.bytes(), 0).map_err(sock("send"))?;
    if n != batch.bytes().len() {
        return Err(ApplyError::Socket {
            what: "send",
            error: std::io::Error::other(format!("sent {n} of {} bytes", batch.bytes().len())),
        });
    }
    s.set_non_blocking(true).map_err(sock("O_NONBLOCK"))?;
    Ok(s)
}

/// What the kernel answered a batch.
struct Answers {
    /// The last message (the only one that asks for it) was acknowledged.
    acked: bool,
    /// Some answers were lost: more than the receive buffer holds.
    overflow: bool,
    /// (sequence number, errno) of each message refused.
    errors: Vec<(u32, i32)>,
}

/// Reads the answers queued on `s` until there are none left.
fn read_answers(s: &mut netlink_sys::Socket, last_seq: Option<u32>) -> Result<Answers, ApplyError> {
    let mut answers = Answers {
        acked: false,
        overflow: false,
        errors: Vec::new(),
    };
    // Answers carry only headers (NETLINK_CAP_ACK): 36 bytes each, one per `recv`.
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        buf.clear();
        match s.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // More errors than the receive buffer holds: the first ones are still queued.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                answers.overflow = true;
                continue;
            }
            Err(e) => {
                return Err(ApplyError::Socket {
                    what: "recv",
                    error: e,
                });
            }
        }
        let messages = super::split(&buf).map_err(|e| ApplyError::Socket {
            what: "reading an answer",
            error: std::io::Error::other(e.to_string()),
        })?;
        for (header, bytes) in messages {
            if header.message_type != NLMSG_ERROR {
                continue;
            }
            match error_code(bytes) {
                Some(0) => answers.acked |= Some(header.sequence_number) == last_seq,
                Some(code) => answers.errors.push((header.sequence_number, -code)),
                None => {
                    return Err(ApplyError::Socket {
                        what: "reading an answer",
                        error: std::io::Error::other("a truncated netlink error message"),
                    });
                }
            }
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nft::{Chain, PortRange, Rule};

    fn tx(stmts: Vec<Stmt>) -> Transaction {
        Transaction {
            ops: vec![
                Op::DeleteTable("t".into()),
                Op::AddTable("t".into()),
                Op::AddChain(Chain {
                    table: "t".into(),
                    name: "c".into(),
                    base: None,
                }),
                Op::AddRule(Rule {
                    table: "t".into(),
                    chain: "c".into(),
                    stmts,
                }),
            ],
        }
    }

    #[test]
    fn every_message_maps_back_to_its_op() {
        let ports = vec![PortRange::port(53), PortRange::range(1000, 2000)];
        let b = encode(&tx(vec![
            Stmt::Port {
                proto: L4::Tcp,
                dir: Dir::Dst,
                negate: true,
                ports,
            },
            Stmt::Verdict(Verdict::Return),
        ]))
        .unwrap();
        // add + delete table, add table, chain, set + elements + rule.
        assert_eq!(b.messages(), 7);
        let ops: Vec<Option<usize>> = (b.begin_seq..b.begin_seq + 9).map(|s| b.op_of(s)).collect();
        let want = [
            None,
            Some(0),
            Some(0),
            Some(1),
            Some(2),
            Some(3),
            Some(3),
            Some(3),
            None,
        ];
        assert_eq!(ops, want);
        // Begin, the messages, end: every header's length adds up to the whole batch.
        let mut off = 0;
        let mut n = 0;
        while off < b.bytes().len() {
            off += NetlinkBuffer::new(&b.bytes()[off..]).length() as usize;
            n += 1;
        }
        assert_eq!((off, n), (b.bytes().len(), 9));
    }

    #[test]
    fn invalid_rules_are_not_encoded() {
        let e = encode(&tx(vec![
            Stmt::L4Proto(L4::Udp),
            Stmt::Port {
                proto: L4::Tcp,
                dir: Dir::Dst,
                negate: false,
                ports: vec![PortRange::port(53)],
            },
        ]))
        .unwrap_err();
        assert_eq!(e.op, 3);
        assert!(
            e.reason.to_string().contains("conflicting protocols"),
            "{e}"
        );
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(12, 4), [0xff, 0xf0, 0, 0]);
        assert_eq!(prefix_mask(0, 4), [0, 0, 0, 0]);
        assert_eq!(prefix_mask(33, 16)[..5], [0xff, 0xff, 0xff, 0xff, 0x80]);
    }

    #[test]
    fn set_user_data_is_nfts() {
        // What nft 1.0.6 writes for `tcp dport != { 53, 15008 }` (a plain set) and for
        // `udp sport { 53, 1000-2000 }` (an interval set), on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(
                set_udata(L4::Tcp, Dir::Dst, false),
                [
                    0, 4, 2, 0, 0, 0, 3, 0x14, 0, 4, 7, 0, 0, 0, 1, 0x0c, 0, 4, 8, 0, 0, 0, 1, 4,
                    2, 0, 0, 0
                ]
            );
            assert_eq!(
                set_udata(L4::Udp, Dir::Src, true),
                [
                    0, 4, 2, 0, 0, 0, 2, 4, 1, 0, 0, 0, 3, 0x14, 0, 4, 7, 0, 0, 0, 1, 0x0c, 0, 4,
                    6, 0, 0, 0, 1, 4, 1, 0, 0, 0
                ]
            );
        }
    }

    #[test]
    fn removals_in_iptables_nft_tables_are_encoded_as_nft_encodes_them() {
        use crate::nft::ChainRef;
        let at = |chain: &str| ChainRef {
            family: Family::V4,
            table: "nat".into(),
            chain: chain.into(),
        };
        let b = encode(&Transaction {
            ops: vec![
                Op::DeleteRule(at("OUTPUT"), 3),
                Op::FlushChain(at("ISTIO_X")),
                Op::DeleteChain(at("ISTIO_X")),
            ],
        })
        .unwrap();
        // nft 1.0.6's batch for `delete rule ip nat OUTPUT handle 3; flush chain ip nat
        // ISTIO_X; delete chain ip nat ISTIO_X` (strace): per message, its type and what
        // follows the netlink header (struct nfgenmsg: AF_INET, then the attributes).
        let nfgen = [2, 0, 0, 0];
        let nat = [8, 0, 1, 0, b'n', b'a', b't', 0];
        let want: [(u16, Vec<u8>); 3] = [
            (
                0x0a08,
                [
                    &nfgen[..],
                    &nat,
                    &[11, 0, 2, 0, b'O', b'U', b'T', b'P', b'U', b'T', 0, 0],
                    &[12, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 3],
                ]
                .concat(),
            ),
            (
                0x0a08,
                [&nfgen[..], &nat, &[12, 0, 2, 0], b"ISTIO_X\0"].concat(),
            ),
            (
                0x0a05,
                [&nfgen[..], &nat, &[12, 0, 3, 0], b"ISTIO_X\0"].concat(),
            ),
        ];
        let mut off = 0;
        let mut got = Vec::new();
        while off < b.bytes().len() {
            let m = NetlinkBuffer::new(&b.bytes()[off..]);
            let len = m.length() as usize;
            got.push((m.message_type(), b.bytes()[off + 16..off + len].to_vec()));
            off += len;
        }
        assert_eq!(got.len(), 5, "begin, three messages, end");
        assert_eq!(got[1..4], want);
    }
}
