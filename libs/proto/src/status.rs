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
    Status::new(code, err.to_string())
}

/// The reverse, for clients that branch on the kind of failure.
pub fn into_error(status: Status) -> Error {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => Error::invalid("request", message),
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
