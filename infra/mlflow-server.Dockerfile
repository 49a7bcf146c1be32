# The MLflow tracking server for the cluster (infra/k8s/mlflow-server.yaml). The official image
# has neither a PostgreSQL driver, boto3 nor the basic-auth app's Flask-WTF, so this one adds them:
#   docker build -f infra/mlflow-server.Dockerfile -t ghcr.io/finetune-pipeline/mlflow-server:3.17.2 infra
FROM python:3.11.7-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.43.117 \
    && useradd --create-home --uid 10001 mlflow
USER 10001
EXPOSE 5000
