use reaper::{events, probes};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("debug").init();
    let mut p = probes::Probes::attach(Default::default())?;
    let ring = p.take_ring().unwrap()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let (_ftx, frx) = tokio::sync::mpsc::channel(1);
    let stats = std::sync::Arc::new(events::source::SourceStats::default());
    tokio::spawn(events::source::run(ring, tx, frx, stats));
    while let Some(m) = rx.recv().await {
        if let events::source::SourceMsg::Events(v) = m { for e in v { println!("{e}"); } }
    }
    Ok(())
}
