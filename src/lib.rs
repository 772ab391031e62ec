//! The embedded platform behind `capstan dev`, as a library: the `capstan`
//! binary runs it, and `capstan-scale-bench` starts it to put simulated
//! nodes beside it.

pub mod dev;
