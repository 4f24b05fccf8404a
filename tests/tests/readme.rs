//! The README's library section is code that builds: its `[dependencies]` lines and its
//! program are extracted, written as a crate outside the workspace (a path dependency on this
//! checkout, the workspace's lock file, `--offline`), built, and run against a real gateway
//! (issue 17, item 11). The README cannot drift from the library.

use std::path::{Path, PathBuf};
use std::process::Command;

use didgate_tests::Harness;

/// The fenced blocks of `lang` in the README section headed `heading` (up to the next `### `).
fn blocks(readme: &str, heading: &str, lang: &str) -> anyhow::Result<Vec<String>> {
    let start = readme
        .find(heading)
        .ok_or_else(|| anyhow::anyhow!("README has no {heading:?}"))?;
    let rest = &readme[start + heading.len()..];
    let section = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut tail = section;
    while let Some(i) = tail.find(&fence) {
        let body = &tail[i + fence.len()..];
        let end = body
            .find("```")
            .ok_or_else(|| anyhow::anyhow!("an unclosed {lang} block"))?;
        out.push(body[..end].to_string());
        tail = &body[end + 3..];
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_library_snippet_builds_outside_the_workspace_and_runs() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let heading = "### Agent: the `didgate-client` library";
    let deps = blocks(&readme, heading, "toml")?;
    let programs = blocks(&readme, heading, "rust")?;
    anyhow::ensure!(
        deps.len() == 1,
        "one [dependencies] block, found {}",
        deps.len()
    );
    anyhow::ensure!(programs.len() == 1, "one program, found {}", programs.len());
    let deps = deps[0].replace(
        "path/to/didgate/client",
        &root.join("client").display().to_string(),
    );
    anyhow::ensure!(
        deps.contains(&root.display().to_string()),
        "the path line: {deps}"
    );

    // The snippet is built without debug info: what is tested is that it builds and runs, and
    // its dependencies' debug info (opt-level 0, its own target directory) was 1.3 GB of disk.
    const PROFILE: &str = "[profile.dev]\ndebug = false\n";
    let dir = tempfile::tempdir()?;
    let krate = dir.path().join("snippet");
    std::fs::create_dir_all(krate.join("src"))?;
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"readme-snippet\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n[workspace]\n\n{deps}\n{PROFILE}"
        ),
    )?;
    std::fs::write(krate.join("src/main.rs"), &programs[0])?;
    std::fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock"))?;
    // its own target directory: the workspace's is locked by the `cargo test` running this
    let target = root.join("target").join("readme-snippet");
    let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
    let out = Command::new(cargo)
        .args(["build", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&krate)
        .output()?;
    assert!(
        out.status.success(),
        "the README snippet does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // It runs: a new identity, a pinned gateway, a call its DID is not allowed (a typed
    // refusal with advice), a sealed chain.
    let mut h = Harness::start().await?;
    let bin = target.join("debug").join("readme-snippet");
    let (addr, did) = (h.addr.to_string(), h.gw_did.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .env("GATEWAY_ADDR", addr)
            .env("GATEWAY_DID", did)
            .current_dir(&krate)
            .output()
    })
    .await??;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("my DID, for the operator's policy: did:key:z6Mk"),
        "{stdout}"
    );
    assert!(
        stderr.contains("refused"),
        "a refusal, with advice: {stderr}"
    );
    assert!(dir.path().join("snippet/agent.identity").is_file());
    assert!(dir.path().join("snippet/agent-chain").is_dir());
    h.stop().await;
    Ok(())
}

/// A local OpenAI-style upstream: POST /v1/chat/completions answers a completion when the
/// request carries `Bearer KEY`, 401 otherwise.
async fn chat_upstream(
    key: &'static str,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let authorized = req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .is_some_and(|v| v.as_bytes() == format!("Bearer {key}").as_bytes());
                    let (status, body) = match (authorized, req.uri().path()) {
                        (true, "/v1/chat/completions") => (
                            200,
                            r#"{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hi"}}]}"#,
                        ),
                        (true, _) => (404, "{}"),
                        (false, _) => (401, "{}"),
                    };
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                            .unwrap_or_default(),
                    )
                },
            );
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// The operator quickstart's local example (issue 17, item 13), as the README gives it: its
/// `[[upstream]]` and `[[upstream.operation]]` tables in a fresh `didgated init` directory with
/// `policy_file` set, its Cedar permit with the agent's DID, the secret added; a real gateway
/// serves it and the agent's call reaches the upstream with the key injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_operator_example_serves_the_agent() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let heading = "### Operator: `didgated`";
    let tables = blocks(&readme, heading, "toml")?;
    let policies = blocks(&readme, heading, "cedar")?;
    anyhow::ensure!(
        tables.len() == 1 && policies.len() == 1,
        "one toml and one cedar block"
    );
    let (upstream, task) = chat_upstream("sk-readme-example").await?;

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gateway");
    let gw_did = didgate_gateway::init(&data, "127.0.0.1:0".parse()?)?;
    let config = std::fs::read_to_string(data.join("gateway.toml"))?;
    let commented = "# policy_file = \"policies.cedar\"";
    anyhow::ensure!(
        config.contains(commented),
        "init writes the policy_file line commented"
    );
    let config = config.replacen(commented, "policy_file = \"policies.cedar\"", 1)
        + "\n"
        + &tables[0].replace("127.0.0.1:8080", &upstream.to_string());
    std::fs::write(data.join("gateway.toml"), config)?;
    let agent = didgate_protocol::Identity::from_seed(&[0x4e; 32]);
    std::fs::write(
        data.join("policies.cedar"),
        policies[0].replace("AGENT_DID", agent.did().as_str()),
    )?;
    didgate_gateway::add_secret(&data, "openai-key", "sk-readme-example")?;

    let gw = std::sync::Arc::new(didgate_gateway::gateway::Gateway::open(&data).await?);
    let endpoint = didgate_gateway::server::endpoint(&gw, gw.config().gateway().listen)?;
    let addr = endpoint.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(didgate_gateway::server::serve(
        gw.clone(),
        endpoint,
        async {
            let _ = stopped.await;
        },
    ));
    let client =
        didgate_client::Client::open(agent, &dir.path().join("chain"), addr, gw_did).await?;
    let answer = client
        .call(
            didgate_client::CallSpec::new("openai", "POST", "/v1/chat/completions")
                .header("content-type", "application/json")
                .body(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        )
        .await?;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(String::from_utf8_lossy(&answer.body).contains("chat.completion"));
    // the permit is exactly that: another path of the upstream is refused by policy
    let other = client
        .call(didgate_client::CallSpec::new(
            "openai",
            "POST",
            "/v1/embeddings",
        ))
        .await;
    assert!(
        matches!(other, Err(didgate_client::CallError::Refused { .. })),
        "{other:?}"
    );
    client.close().await;
    let _ = stop.send(());
    server.await?;
    task.abort();
    Ok(())
}
