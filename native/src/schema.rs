//! The five event types' fields, as schemas/events.py defines them (msgspec structs): names in
//! definition order (the order the normalized JSON writes them), types with their bounds,
//! nullability, defaults. tests/unit/test_native_ingest.py compares these tables with the structs,
//! so a change to one fails until the other follows.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Gpu,
    Api,
    Storage,
    SessionStarted,
    SessionEnded,
}

impl Kind {
    pub fn of_tag(tag: &[u8]) -> Option<Kind> {
        Some(match tag {
            b"gpu.usage.v1" => Kind::Gpu,
            b"api.request.v1" => Kind::Api,
            b"storage.usage.v1" => Kind::Storage,
            b"session.started.v1" => Kind::SessionStarted,
            b"session.ended.v1" => Kind::SessionEnded,
            _ => return None,
        })
    }

    pub fn tag(self) -> &'static str {
        match self {
            Kind::Gpu => "gpu.usage.v1",
            Kind::Api => "api.request.v1",
            Kind::Storage => "storage.usage.v1",
            Kind::SessionStarted => "session.started.v1",
            Kind::SessionEnded => "session.ended.v1",
        }
    }

    pub fn fields(self) -> &'static [Field] {
        match self {
            Kind::Gpu => GPU,
            Kind::Api => API,
            Kind::Storage => STORAGE,
            Kind::SessionStarted => STARTED,
            Kind::SessionEnded => ENDED,
        }
    }
}

#[derive(Clone, Copy)]
pub enum Default {
    Required,
    Null,
    Int(u64),
    Str(&'static str),
}

#[derive(Clone, Copy)]
pub enum Type {
    Str { min: usize, max: usize },
    Int { min: u64, max: u64 },
    Quantity,
}

pub struct Field {
    pub name: &'static str,
    pub kind: Type,
    pub nullable: bool,
    pub default: Default,
}

const fn field(name: &'static str, kind: Type, nullable: bool, default: Default) -> Field {
    Field {
        name,
        kind,
        nullable,
        default,
    }
}

// The structs of schemas/events.py, field for field (Ident: 1..256 code points, Label: 1..128,
// Count: 0..10^12, Seconds: 0..31 days); a test compares these tables with the structs.
const IDENT: Type = Type::Str { min: 1, max: 256 };
const LABEL: Type = Type::Str { min: 1, max: 128 };
const COUNT: Type = Type::Int {
    min: 0,
    max: 1_000_000_000_000,
};
const REQ: Default = Default::Required;
const NULL: Default = Default::Null;

pub mod gpu {
    pub const SESSION_ID: usize = 0;
    pub const PROVIDER_ID: usize = 1;
    pub const GPU_MODEL: usize = 3;
    pub const GPU_COUNT: usize = 4;
    pub const VRAM_TOTAL: usize = 5;
    pub const VRAM_ALLOCATED: usize = 6;
    pub const POWER: usize = 7;
    pub const UTILIZATION: usize = 8;
    pub const INTERVAL: usize = 9;
}
const GPU: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("provider_id", IDENT, false, REQ),
    field("node_id", IDENT, false, REQ),
    field("gpu_model", LABEL, false, REQ),
    field(
        "gpu_count",
        Type::Int { min: 1, max: 1024 },
        false,
        Default::Int(1),
    ),
    field("vram_total_gb", Type::Quantity, false, REQ),
    field("vram_allocated_gb", Type::Quantity, false, REQ),
    field("power_watts", Type::Quantity, false, REQ),
    field("utilization", Type::Quantity, false, REQ),
    field(
        "interval_seconds",
        Type::Int {
            min: 1,
            max: 86_400,
        },
        false,
        REQ,
    ),
    field("region", LABEL, true, NULL),
];

pub mod api {
    pub const REQUEST_COUNT: usize = 1;
    pub const TOKENS_IN: usize = 2;
    pub const TOKENS_OUT: usize = 3;
    pub const PRODUCT_ID: usize = 4;
    pub const STATUS: usize = 6;
}
const API: &[Field] = &[
    field("endpoint", Type::Str { min: 1, max: 512 }, false, REQ),
    field("request_count", COUNT, false, Default::Int(1)),
    field("tokens_in", COUNT, false, Default::Int(0)),
    field("tokens_out", COUNT, false, Default::Int(0)),
    field("product_id", LABEL, true, NULL),
    field("service_type", LABEL, false, Default::Str("api_gateway")),
    field(
        "status",
        Type::Int { min: 100, max: 599 },
        false,
        Default::Int(200),
    ),
    field("latency_ms", COUNT, true, NULL),
    field("region", LABEL, true, NULL),
];

pub mod storage {
    pub const KIND: usize = 0;
    pub const GB: usize = 2;
    pub const DURATION: usize = 3;
}
const STORAGE: &[Field] = &[
    field("storage_kind", LABEL, false, REQ),
    field("resource_id", IDENT, false, REQ),
    field("gb", Type::Quantity, false, REQ),
    field(
        "duration_seconds",
        Type::Int {
            min: 1,
            max: 31 * 86_400,
        },
        false,
        REQ,
    ),
    field("region", LABEL, true, NULL),
];

pub mod session {
    pub const SESSION_ID: usize = 0;
    pub const RESOURCE_TIER: usize = 6; // session.started
    pub const DURATION: usize = 2; // session.ended
}
const STARTED: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("provider_id", IDENT, true, NULL),
    field("node_id", IDENT, true, NULL),
    field("gpu_model", LABEL, true, NULL),
    field("vram_total_gb", Type::Quantity, true, NULL),
    field("vram_allocated_gb", Type::Quantity, true, NULL),
    field("resource_tier", LABEL, true, NULL),
    field("region", LABEL, true, NULL),
];
const ENDED: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("reason", LABEL, false, Default::Str("completed")),
    field(
        "duration_seconds",
        Type::Int {
            min: 0,
            max: 31 * 86_400,
        },
        true,
        NULL,
    ),
];

/// (field, type with bounds, nullable, default) of one field.
pub type FieldInfo = (&'static str, String, bool, String);
/// (event type, fields) of every event type.
pub type Schema = Vec<(&'static str, Vec<FieldInfo>)>;

/// The field tables, for the test that compares them with schemas/events.py.
pub fn schema() -> Schema {
    [
        Kind::Gpu,
        Kind::Api,
        Kind::Storage,
        Kind::SessionStarted,
        Kind::SessionEnded,
    ]
    .into_iter()
    .map(|kind| {
        let fields = kind
            .fields()
            .iter()
            .map(|f| {
                let kind = match f.kind {
                    Type::Str { min, max } => format!("str[{min},{max}]"),
                    Type::Int { min, max } => format!("int[{min},{max}]"),
                    Type::Quantity => "decimal".to_string(),
                };
                let default = match f.default {
                    Default::Required => "required".to_string(),
                    Default::Null => "None".to_string(),
                    Default::Int(v) => v.to_string(),
                    Default::Str(s) => s.to_string(),
                };
                (f.name, kind, f.nullable, default)
            })
            .collect();
        (kind.tag(), fields)
    })
    .collect()
}
