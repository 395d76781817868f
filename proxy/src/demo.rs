pub async fn run(_d: std::time::Duration) -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}
