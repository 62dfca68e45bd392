# Lambda container image for the visual-inspection scorer (ONNX Runtime, no torch).
#
# Why provided:al2023 + Python 3.11 and not public.ecr.aws/lambda/python:3.11:
# the python:3.11 Lambda base image is Amazon Linux 2 (glibc 2.26), but the pinned
# serving wheels need a newer glibc (onnxruntime 1.32.0 ships only manylinux_2_28,
# numpy 2.4.6 / pillow 13.0.0 only manylinux_2_27+), so `pip install` there fails with
# "No matching distribution". AL2023 (glibc 2.34) runs them, and its python3.11 keeps the
# interpreter the project is tested with. The runtime interface client (awslambdaric, which
# the python:* images bundle) is installed at the version pinned in requirements.txt, the one
# tests/serving/test_clean_venv.py drives through the real Lambda Runtime API.
#
# Local run (no Lambda): the base image ships the Runtime Interface Emulator:
#   docker run -p 9000:8080 --entrypoint /usr/local/bin/aws-lambda-rie IMAGE \
#       /opt/venv/bin/python -m awslambdaric serving.app.handler
FROM public.ecr.aws/lambda/provided:al2023

ARG MODEL_VERSION=unknown
ARG MODEL_NAME=unknown
ARG MODEL_SHA256=unknown
ARG GIT_COMMIT=unknown
ARG AWSLAMBDARIC_VERSION=4.2.2

LABEL org.opencontainers.image.title="visual-inspection-serving" \
      org.opencontainers.image.description="Anomaly scoring Lambda (anomalib model exported to ONNX)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.version="${MODEL_VERSION}" \
      visual-inspection.model.version="${MODEL_VERSION}" \
      visual-inspection.model.name="${MODEL_NAME}" \
      visual-inspection.model.sha256="${MODEL_SHA256}" \
      visual-inspection.git.commit="${GIT_COMMIT}"

# The AL2023 release (and so the python3.11 build) is fixed by the base image tag.
# hadolint ignore=DL3041
RUN dnf install -y python3.11 python3.11-pip \
    && dnf clean all \
    && rm -rf /var/cache/dnf

# Only the serving requirements: no torch, torchvision, anomalib or lightning in the image.
COPY serving/requirements.txt /tmp/serving-requirements.txt
# --only-binary: every pin has a wheel for this glibc (checked with `pip download --platform
# manylinux_2_34_x86_64 ... --only-binary=:all:`), so a source build here would mean a wrong pin.
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/serving-requirements.txt \
        "awslambdaric==${AWSLAMBDARIC_VERSION}" \
    && rm /tmp/serving-requirements.txt

# Lambda's filesystem is read-only except /tmp: point HOME and every cache there, switch
# telemetry off (nothing may phone home from a Lambda), never write .pyc at runtime.
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    OPENVINO_TELEMETRY_DISABLE=1 \
    DO_NOT_TRACK=1 \
    POWERTOOLS_SERVICE_NAME=visual-inspection \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=${LAMBDA_TASK_ROOT}/serving/model \
    MODEL_VERSION=${MODEL_VERSION} \
    GIT_COMMIT=${GIT_COMMIT}

WORKDIR ${LAMBDA_TASK_ROOT}

# Two folders, copied whole: the torch-free core (model contract, preprocessing, ONNX Runtime
# session, answer analysis) and the Lambda adapter (tests/serving/test_dockerfile.py checks that
# the handler imports nothing outside them).
COPY core/ ${LAMBDA_TASK_ROOT}/core/
# serving/ includes the promoted model (serving/model/: model.onnx + metadata.json).
COPY serving/ ${LAMBDA_TASK_ROOT}/serving/

# Byte-compile now (the runtime cannot), and fail the build if the model does not load here.
RUN python -m compileall -q core serving \
    && python -c "from core.scoring import Scorer; Scorer.from_dir('serving/model')"

ENTRYPOINT ["/opt/venv/bin/python", "-m", "awslambdaric"]
CMD ["serving.app.handler"]
