//! `config.sh remove`: deregister the agent and delete its files (`ConfigurationManager.UnconfigureAsync`).
//! Refused while a listener of this folder runs.

use reqwest::Method;
use serde_json::json;

use super::client::{API_VERSION, Auth};
use super::configure::{connect, find_agent};
use super::files::{self, ListenerLock};
use super::{CommandLine, Context, StandinError, diag};

pub async fn remove(ctx: &Context, cmd: &CommandLine) -> Result<(), StandinError> {
    ListenerLock::ensure_not_running(&ctx.root)?;
    let configured = files::is_configured(&ctx.root);
    let has_credentials = ctx.root.join(files::CREDENTIALS_FILE).is_file();
    let mut deleted_agent = None;
    if configured && has_credentials {
        let settings = files::load_settings(&ctx.root)?;
        let (client, token) = connect(ctx, cmd, &settings.server_url)?;
        let auth = Auth::Pat(token);
        println!("Removing agent from the server");
        match find_agent(&client, &auth, settings.pool_id, &settings.agent_name).await? {
            None => println!("Skipping removing agent from the server: it is not there"),
            Some(_) => {
                let result = client
                    .call(
                        "delete agent",
                        Method::DELETE,
                        &format!(
                            "/_apis/distributedtask/pools/{}/agents/{}",
                            settings.pool_id, settings.agent_id
                        ),
                        &[],
                        API_VERSION,
                        &auth,
                        None,
                    )
                    .await;
                match result {
                    Ok(_) => deleted_agent = Some(settings.agent_id),
                    // Gone between the lookup and the delete: the goal is reached.
                    Err(StandinError::Http { status: 404, .. }) => {}
                    Err(e) => return Err(e),
                }
                println!("Succeeded: Removing agent from the server");
            }
        }
    } else {
        println!(
            "Cannot remove the agent from the server: it is not configured (no .agent / .credentials)"
        );
    }
    if has_credentials {
        files::remove_file_if_present(&ctx.root.join(files::CREDENTIALS_FILE))?;
        files::remove_file_if_present(&ctx.root.join(files::RSA_PARAMS_FILE))?;
        println!("Succeeded: Removing .credentials");
    }
    if configured {
        files::remove_file_if_present(&ctx.root.join(files::AGENT_FILE))?;
        println!("Succeeded: Removing .agent");
    }
    diag::event(
        &ctx.root,
        "removed",
        json!({"deletedAgentId": deleted_agent, "wasConfigured": configured, "envInputs": cmd.env_input_names(), "argv": ctx.masked_argv()}),
    );
    Ok(())
}
