# One image for workers and producers. The model is prepared at first start into the cache volume.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# cpu or cuda torch build; auto = CPU here, since no GPU is visible during `docker build`.
ARG TORCH_DEVICE=auto
RUN make setup VENV=/opt/venv TORCH_DEVICE=$TORCH_DEVICE && /opt/venv/bin/pip install -q ".[ops]"
ENV PATH=/opt/venv/bin:$PATH AUTOGLM_CACHE_DIR=/cache
CMD ["sh", "-c", "autoglm models prepare && python -m workers"]
