#!/bin/sh
# One-shot `minio-init` (runs in the minio/mc image): creates the pipeline's bucket and a user
# that may read, write, list and delete in that bucket only (the pipeline never uses the root
# account, and its user gets no other bucket nor any admin right). Safe to run on every start;
# any failure stops it, which keeps every Airflow component from starting (compose depends_on).
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${SHOPLENS_S3_BUCKET:?}" "${SHOPLENS_S3_ACCESS_KEY:?}" "${SHOPLENS_S3_SECRET_KEY:?}"
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
POLICY=shoplens-pipeline

refuse_placeholder() {
    case "$2" in
        CHANGE-ME*)
            echo "minio-init: $1 is still the CHANGE-ME placeholder from docker/.env.example;" \
                 "set a real secret in docker/.env" >&2
            exit 78
            ;;
    esac
}
refuse_placeholder MINIO_ROOT_PASSWORD "$MINIO_ROOT_PASSWORD"
refuse_placeholder SHOPLENS_S3_SECRET_KEY "$SHOPLENS_S3_SECRET_KEY"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$SHOPLENS_S3_BUCKET"

policy_file="$(mktemp)"
trap 'rm -f "$policy_file"' EXIT
cat > "$policy_file" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$SHOPLENS_S3_BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$SHOPLENS_S3_BUCKET/*"]
    }
  ]
}
EOF
mc admin policy create local "$POLICY" "$policy_file"
mc admin user add local "$SHOPLENS_S3_ACCESS_KEY" "$SHOPLENS_S3_SECRET_KEY"

# A restart finds the policy attached already; MinIO answers that with an error, which is the
# only one tolerated here.
if ! attach_output="$(mc admin policy attach local "$POLICY" --user "$SHOPLENS_S3_ACCESS_KEY" 2>&1)"; then
    case "$attach_output" in
        *"already in effect"*) ;;
        *)
            echo "minio-init: cannot attach policy $POLICY to $SHOPLENS_S3_ACCESS_KEY: $attach_output" >&2
            exit 1
            ;;
    esac
fi
echo "bucket $SHOPLENS_S3_BUCKET ready; user $SHOPLENS_S3_ACCESS_KEY limited to it ($POLICY)"
