#![forbid(unsafe_code)]

#[tokio::main]
async fn main() {
    std::process::exit(cornjacket::cli::main().await);
}
