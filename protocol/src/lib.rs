//! Phoenix channel frames as Supabase Realtime speaks them, without I/O.
//!
//! Bytes in, typed values out; typed values in, bytes out. No sockets, no runtime, no clock.
//!
//! - [`frame`]: the message model (`join_ref`, `ref`, `topic`, `event`, `payload`), the two
//!   text serializers ([`Vsn::V1`] JSON objects, [`Vsn::V2`] JSON arrays) and decoding of
//!   whatever a client sends.
//! - [`binary`]: V2 binary frames. Kind 3 (a client's broadcast push) is decoded, kind 4 (a
//!   user broadcast to a receiver) is encoded. Kinds 0, 1 and 2 are never produced: realtime-js
//!   throws on them.
//! - [`payload`]: typed payloads of the client pushes (`phx_join` with its whole `config`,
//!   `access_token`, `presence`, `broadcast`), cast as leniently as the reference server casts
//!   them, and builders for the server's replies and pushes.
//!
//! Decoders never panic: every malformed input gives a [`DecodeError`].

pub mod binary;
pub mod frame;
pub mod payload;

pub use binary::{BinaryPush, PayloadEncoding};
pub use frame::{DecodeError, Inbound, Ref, Vsn};
