# The gateway image: built from this repository, one static-ish binary on a slim base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p realtime-gateway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/realtime-gateway /usr/local/bin/realtime-gateway
ENV HOST=0.0.0.0 PORT=4000
EXPOSE 4000
USER nobody
ENTRYPOINT ["/usr/local/bin/realtime-gateway"]
