#![forbid(unsafe_code)]

// The request path allocates many small, short-lived buffers (JSON, headers, envelopes): glibc's
// malloc/free were ~18% of the platform's CPU samples under ingest-max (perf, 2026-11-24).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    std::process::exit(cornjacket::cli::main().await);
}
