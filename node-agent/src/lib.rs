//! kvroute node-agent: owns one engine, serves the OpenAI-compatible HTTP API and the gRPC
//! capacity service.
