//! Fuzzes virtio-blk descriptor-chain parsing: the input is laid over guest memory (descriptor
//! tables, available rings, buffers) and every queue is notified.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::fuzzing::fuzz_block(data);
});
