//! Closed vocabularies stored as text: each is an enum that serializes, parses and binds
//! to SQL by its one spelling, so no status list is written twice.

/// Stores an enum with `as_str` and `FromStr` as a TEXT column on either backend.
macro_rules! sql_text {
    ($name:ident) => {
        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            for<'a> &'a str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <&str as sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <&str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            &'q str: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer<'q>,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, DB>>::encode(self.as_str(), buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(
                value: <DB as sqlx::Database>::ValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, DB>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}
pub(crate) use sql_text;

/// Declares a vocabulary: the enum, its spellings, `ALL`, `Display`, `FromStr`, serde and
/// SQL.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident, $noun:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        // Written out rather than derived: the derive, inside a macro, lists the variants'
        // Rust names instead of the spellings serde writes.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .description(Some(concat!("The ", $noun, ".")))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Every spelling, for "must be one of" messages.
            pub fn spellings() -> String {
                [$($text),+].join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("unknown {} {s:?}; expected one of {}", $noun, $name::spellings())),
                }
            }
        }

        $crate::domain::vocabulary::sql_text!($name);
    };
}
pub(crate) use vocabulary;

vocabulary!(
    /// How one agent's run of a job ended (or that it still runs).
    AttemptStatus, "attempt status" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Interrupted = "interrupted",
        Cancelled = "cancelled",
        /// The agent went silent or forgot the attempt.
        Lost = "lost",
    }
);

vocabulary!(
    /// An enrolled agent's state as the control plane sees it.
    AgentStatus, "agent status" {
        Online = "online",
        Offline = "offline",
        /// Finishes its attempt but claims no new work.
        Draining = "draining",
    }
);

vocabulary!(
    /// Where a training file's enrichment (parsing, counting, scoring) stands.
    EnrichmentStatus, "enrichment status" {
        Pending = "pending",
        Processing = "processing",
        Completed = "completed",
        Failed = "failed",
    }
);

vocabulary!(
    /// The kind of a job event.
    EventType, "event type" {
        Status = "status",
        Metrics = "metrics",
        Warning = "warning",
        Error = "error",
        Checkpoint = "checkpoint",
        Info = "info",
    }
);

/// How much a job event matters: one vocabulary with the agent protocol's.
pub use protocol::agent::Severity;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for status in AttemptStatus::ALL {
            assert_eq!(status.as_str().parse::<AttemptStatus>(), Ok(*status));
        }
        assert_eq!(
            "bogus".parse::<Severity>(),
            Err(
                "unknown severity \"bogus\"; expected one of info, warning, error, critical"
                    .to_owned()
            )
        );
    }
}
