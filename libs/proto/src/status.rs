use capstan_types::Error;
use tonic::{Code, Status};

/// Maps a domain error to its gRPC status. Every server uses this, so one
/// kind of failure always has one code.
pub fn status(err: Error) -> Status {
    let code = match &err {
        Error::Invalid(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::Conflict(_) => Code::Aborted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    };
    let mut status = Status::new(code, err.to_string());
    if let Error::Invalid(fields) = &err {
        // The fields, structured, for clients that show them at the field
        // (the HTTP gateway's problem+json): `[{"field", "reason"}]`.
        let fields: Vec<serde_json::Value> = fields
            .iter()
            .map(|f| serde_json::json!({"field": f.field, "reason": f.reason}))
            .collect();
        let bytes = serde_json::to_vec(&fields).unwrap_or_default();
        status.metadata_mut().insert_bin(
            FIELD_ERRORS,
            tonic::metadata::MetadataValue::from_bytes(&bytes),
        );
    }
    status
}

/// The binary metadata key of a validation error's fields.
pub const FIELD_ERRORS: &str = "capstan-field-errors-bin";

/// The fields of an INVALID_ARGUMENT status, when it carries them.
fn field_errors(status: &Status) -> Option<Vec<capstan_types::FieldError>> {
    let bytes = status.metadata().get_bin(FIELD_ERRORS)?.to_bytes().ok()?;
    let fields: Vec<serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    let fields: Vec<capstan_types::FieldError> = fields
        .iter()
        .filter_map(|f| {
            Some(capstan_types::FieldError::new(
                f["field"].as_str()?,
                f["reason"].as_str()?,
            ))
        })
        .collect();
    (!fields.is_empty()).then_some(fields)
}

/// The reverse, for clients that branch on the kind of failure.
pub fn into_error(status: Status) -> Error {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => match field_errors(&status) {
            Some(fields) => Error::Invalid(fields),
            None => Error::invalid("request", message),
        },
        Code::NotFound => Error::NotFound(message),
        Code::AlreadyExists => Error::AlreadyExists(message),
        Code::Aborted => Error::Conflict(message),
        Code::FailedPrecondition => Error::FailedPrecondition(message),
        Code::ResourceExhausted => Error::ResourceExhausted(message),
        Code::Unauthenticated => Error::Unauthenticated(message),
        Code::PermissionDenied => Error::PermissionDenied(message),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Error::Unavailable(message),
        _ => Error::Internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_keep_the_field_in_the_message() {
        let status = status(Error::invalid(
            "health.interval",
            "must be between 100ms and 1h",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("health.interval: must be between 100ms and 1h")
        );
    }

    #[test]
    fn codes_round_trip() {
        for err in [
            Error::NotFound("app x".into()),
            Error::Conflict("v".into()),
            Error::Unauthenticated("t".into()),
            Error::PermissionDenied("p".into()),
            Error::Unavailable("u".into()),
        ] {
            let code = status(err).code();
            assert_eq!(status(into_error(Status::new(code, "m"))).code(), code);
        }
    }
}
