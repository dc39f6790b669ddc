//! Unit tests of the transport and devices against mock queues (no KVM).

mod block;
mod fuzz;
mod mmio;
mod net;
mod rng;
