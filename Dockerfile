# pgqueue: one image for the API, the workers and the migration job (docker-compose.yml).
#
# The repository is copied in and installed editable, so `migrations/` sits beside the
# package, where pgqueue looks for it (pgqueue/migrate.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
# The redis extra: REDIS_URL is an optional cache; without Redis nothing changes but speed.
RUN pip install -e '.[redis]' \
    && test -f /app/migrations/env.py \
    && useradd --create-home --uid 10001 pgqueue

USER pgqueue
# Only used if DATABASE_URL is unset (the embedded server); compose always sets it.
ENV PGQUEUE_HOME=/home/pgqueue/.pgqueue

EXPOSE 8000
CMD ["pgqueue", "serve", "--host", "0.0.0.0", "--port", "8000"]
