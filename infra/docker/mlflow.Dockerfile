# syntax=docker/dockerfile:1.7
# MLflow tracking server of infra/k8s/mlflow: PostgreSQL backend, S3 artifact store, basic-auth app.
#   docker build -f infra/docker/mlflow.Dockerfile -t tvlt-mlflow:3.17.2 infra/docker
# A small image of its own: the server needs none of the training stack, and it needs three things the jobs do
# not (Flask-WTF for the auth app, psycopg2 for PostgreSQL, boto3 for the S3 artifact proxy). MLFLOW_VERSION
# must satisfy pyproject.toml's mlflow pin and match the client's minor version (tests/test_infra_manifests.py).
FROM python:3.11-slim-bookworm
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
 && useradd --create-home --uid 1000 mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
