//! The one table mapping domain errors to gRPC status codes.
use adaptivenet_cloud::CloudError;
use tonic::Code;

#[test]
fn every_domain_error_maps_to_its_status_code() {
    let io = || std::io::Error::other("disk");
    let table: Vec<(CloudError, Code)> = vec![
        (CloudError::invalid("field", "bad"), Code::InvalidArgument),
        (CloudError::not_found("oracle", "x"), Code::NotFound),
        (
            CloudError::AlreadyExists {
                kind: "fleet",
                id: "a".into(),
            },
            Code::AlreadyExists,
        ),
        (
            CloudError::FailedPrecondition("busy".into()),
            Code::FailedPrecondition,
        ),
        (
            CloudError::exhausted("size", "too big"),
            Code::ResourceExhausted,
        ),
        (
            CloudError::Unauthenticated("no".into()),
            Code::Unauthenticated,
        ),
        (
            CloudError::PermissionDenied("no".into()),
            Code::PermissionDenied,
        ),
        (CloudError::Cancelled("c".into()), Code::Cancelled),
        (
            CloudError::DeadlineExceeded("upload idle".into()),
            Code::DeadlineExceeded,
        ),
        (
            CloudError::Unavailable("draining".into()),
            Code::Unavailable,
        ),
        (CloudError::DataLoss("digest".into()), Code::DataLoss),
        (
            CloudError::Database(sqlx::Error::PoolTimedOut),
            Code::Unavailable,
        ),
        (
            CloudError::Database(sqlx::Error::RowNotFound),
            Code::NotFound,
        ),
        (
            CloudError::Database(sqlx::Error::Protocol("x".into())),
            Code::Internal,
        ),
        (CloudError::io("/x", io()), Code::Internal),
        (CloudError::Internal("bug".into()), Code::Internal),
    ];
    for (err, code) in table {
        let text = err.to_string();
        assert_eq!(err.code(), code, "{text}");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), code, "{text}");
        assert_ne!(status.code(), Code::Unknown);
        if code == Code::Internal {
            assert!(
                !status.message().contains("/x"),
                "internal details leak: {}",
                status.message()
            );
        }
    }
}

#[test]
fn invalid_argument_names_the_field() {
    let s = tonic::Status::from(CloudError::invalid("header.size_bytes", "truncated"));
    assert!(s.message().contains("header.size_bytes"), "{}", s.message());
}
