//! The `edge-agent` binary's modules (the library is `adaptivenet_edge`): flags, the
//! supernet's source, the one-shot commands and `run`.
pub mod args;
pub mod commands;
pub mod run;
pub mod source;
