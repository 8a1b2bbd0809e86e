# syntax=docker/dockerfile:1
#
# Two images from one file. No Docker engine exists in this project's CI: the file is linted with
# hadolint there, not built.
#
#   Agent (run-once Azure Pipelines agent, entrypoint `azp-autoscaler agent`):
#     docker build --target agent \
#       --build-arg AGENT_VERSION=4.261.0 \
#       --build-arg AGENT_SHA256=<sha256 of vsts-agent-linux-x64-4.261.0.tar.gz> \
#       -t azp-agent:4.261.0 .
#
#   Controller (static binary on distroless/static, non-root):
#     docker build --target controller -t azp-autoscaler .
#
# AGENT_SHA256 is required and has no default on purpose. Its source: the "Agent Downloads" table of the
# release notes of that version, https://github.com/microsoft/azure-pipelines-agent/releases/tag/v<VERSION>
# (column SHA-256, row "Linux x64", or "Linux ARM64" with AGENT_PLATFORM=linux-arm64). Check it against
# the downloaded file yourself once (`sha256sum vsts-agent-linux-x64-<VERSION>.tar.gz`) when bumping.
#
# The agent is unpacked at build time: nothing is downloaded when a pod starts, and self-update is
# disabled by the entrypoint (`agent.disableupdate`), so the version in the image is the version that runs.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

# --- build: the product binary, for glibc (agent image) and musl (static controller image) ---------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# musl-tools: the C parts (aws-lc) of the static build; cmake/clang: aws-lc's build script on some targets.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools cmake clang \
    && rm -rf /var/lib/apt/lists/*
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl > /rust-musl-target ;; \
      arm64) echo aarch64-unknown-linux-musl > /rust-musl-target ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
    && rustup target add "$(cat /rust-musl-target)"
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and compiled dependencies between builds: a change to the
# product's code rebuilds only the product.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin azp-autoscaler \
    && cargo build --release --locked --bin azp-autoscaler --target "$(cat /rust-musl-target)" \
    && install -D -m 0755 target/release/azp-autoscaler /out/glibc/azp-autoscaler \
    && install -D -m 0755 "target/$(cat /rust-musl-target)/release/azp-autoscaler" /out/static/azp-autoscaler

# --- agent-download: the official agent, pinned by version and checksum ---------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS agent-download
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
ARG AGENT_VERSION=4.261.0
ARG AGENT_PLATFORM=linux-x64
ARG AGENT_SHA256
WORKDIR /azp
RUN if [ -z "${AGENT_SHA256}" ]; then \
      echo "AGENT_SHA256 is required: take the SHA-256 of vsts-agent-${AGENT_PLATFORM}-${AGENT_VERSION}.tar.gz from https://github.com/microsoft/azure-pipelines-agent/releases/tag/v${AGENT_VERSION}" >&2; \
      exit 1; \
    fi \
    && curl -fsSL --retry 3 -o /tmp/agent.tar.gz \
      "https://download.agent.dev.azure.com/agent/${AGENT_VERSION}/vsts-agent-${AGENT_PLATFORM}-${AGENT_VERSION}.tar.gz" \
    && echo "${AGENT_SHA256}  /tmp/agent.tar.gz" | sha256sum -c - \
    && tar -xzf /tmp/agent.tar.gz -C /azp \
    && rm /tmp/agent.tar.gz

# --- agent: the image the controller's agent Jobs run ----------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS agent
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="azp-autoscaler agent" \
      org.opencontainers.image.description="Run-once Azure Pipelines agent with the azp-autoscaler entrypoint (workload identity, no PAT)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"
# The agent's own dependency script installs what .NET needs (ICU, OpenSSL, Kerberos, …); git and
# ca-certificates for checkouts; tini as PID 1 (reaps orphaned job processes, passes SIGTERM to the
# entrypoint only). No Azure CLI: the entrypoint gets its token through workload identity.
COPY --from=agent-download /azp /azp
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git tini \
    && /azp/bin/installdependencies.sh \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 agent \
    && useradd --uid 10001 --gid agent --home-dir /home/agent --create-home --shell /bin/bash agent \
    && mkdir -p /azp/_work \
    && chown -R agent:agent /azp
COPY --from=build /out/glibc/azp-autoscaler /usr/local/bin/azp-autoscaler
USER 10001:10001
# The agent folder is the working directory (AZP_AGENT_DIR's default); _work is the work folder.
WORKDIR /azp
# SIGTERM goes through tini to the entrypoint, which forwards it to the listener and deregisters afterwards.
# Give the pod terminationGracePeriodSeconds >= AZP_LISTENER_GRACE_SECONDS + AZP_DEREGISTER_TIMEOUT_SECONDS
# + margin (defaults: 45 + 30 -> 90).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/azp-autoscaler", "agent"]

# --- controller: static binary, distroless, non-root -----------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot AS controller
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="azp-autoscaler controller" \
      org.opencontainers.image.description="Scale-to-zero autoscaler for Azure DevOps agents on Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /out/static/azp-autoscaler /usr/local/bin/azp-autoscaler
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/azp-autoscaler"]
CMD ["controller"]
