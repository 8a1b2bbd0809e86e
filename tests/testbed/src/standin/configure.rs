//! `config.sh` / `Agent.Listener configure`: register the agent (`ConfigurationManager.ConfigureAsync`).

use reqwest::Method;
use serde_json::{Value, json};

use super::capabilities::{os_description, system_capabilities};
use super::client::{API_VERSION, Auth, Client};
use super::files::{self, AgentSettings, CredentialData};
use super::key::{RsaParams, client_assertion};
use super::{AGENT_VERSION, CommandLine, Context, StandinError, diag};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub async fn configure(ctx: &Context, cmd: &CommandLine) -> Result<(), StandinError> {
    if files::is_configured(&ctx.root) {
        return Err(StandinError::AlreadyConfigured);
    }
    let url = cmd.required("url", None)?;
    let (client, token) = connect(ctx, cmd, &url)?;
    let auth = Auth::Pat(token);

    let (key, key_created) = files::create_or_load_key(&ctx.root)?;

    let pool_name = cmd.required("pool", Some("default"))?;
    let pool = find_pool(&client, &auth, &pool_name).await?;
    let pool_id = id_of(&pool, "pool")?;

    let hostname = super::capabilities::computer_name();
    let agent_name = cmd.required("agent", Some(&hostname))?;
    let capabilities = system_capabilities(&ctx.env, &agent_name, &ctx.root);
    let capabilities_json: serde_json::Map<String, Value> = capabilities
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();

    let existing = find_agent(&client, &auth, pool_id, &agent_name).await?;
    let replaced = existing.is_some();
    let registered = match existing {
        Some(mut agent) => {
            if !cmd.flag("replace") {
                return Err(StandinError::AgentExists {
                    pool: pool_name,
                    agent: agent_name,
                });
            }
            // UpdateExistingAgent: new key, version and OS; capabilities merged into the existing ones.
            let agent_id = id_of(&agent, "agent")?;
            agent["authorization"] = json!({"publicKey": key.public_key_json()});
            agent["version"] = json!(AGENT_VERSION);
            agent["osDescription"] = json!(os_description());
            let mut merged = agent
                .get("systemCapabilities")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            merged.extend(capabilities_json);
            agent["systemCapabilities"] = Value::Object(merged);
            client
                .call(
                    "replace agent",
                    Method::PUT,
                    &format!("/_apis/distributedtask/pools/{pool_id}/agents/{agent_id}"),
                    &[],
                    API_VERSION,
                    &auth,
                    Some(&agent),
                )
                .await?
                .body
        }
        None => {
            let agent = json!({
                "name": agent_name,
                "version": AGENT_VERSION,
                "osDescription": os_description(),
                "maxParallelism": 1,
                "provisioningState": "Provisioned",
                "systemCapabilities": capabilities_json,
                "authorization": {"publicKey": key.public_key_json()},
            });
            client
                .call(
                    "add agent",
                    Method::POST,
                    &format!("/_apis/distributedtask/pools/{pool_id}/agents"),
                    &[],
                    API_VERSION,
                    &auth,
                    Some(&agent),
                )
                .await?
                .body
        }
    };
    let agent_id = id_of(&registered, "agent")?;
    let authorization = registered
        .get("authorization")
        .cloned()
        .unwrap_or(Value::Null);
    let (Some(client_id), Some(authorization_url)) = (
        authorization.get("clientId").and_then(Value::as_str),
        authorization
            .get("authorizationUrl")
            .and_then(Value::as_str),
    ) else {
        return Err(StandinError::Protocol {
            call: "add agent",
            message: "the registered agent has no authorization.clientId / authorizationUrl".into(),
        });
    };
    let credentials = CredentialData::oauth(client_id, authorization_url);
    files::save_json(&ctx.root.join(files::CREDENTIALS_FILE), &credentials, 0o600)?;

    // "Testing agent connection": the agent's own OAuth token must be obtainable.
    access_token(&client, &credentials, &key).await?;

    let settings = AgentSettings {
        accept_tee_eula: cmd.flag("acceptteeeula"),
        agent_id,
        agent_name: agent_name.clone(),
        pool_id,
        pool_name: pool_name.clone(),
        server_url: url.clone(),
        work_folder: cmd.required("work", Some("_work"))?,
    };
    files::save_json(&ctx.root.join(files::AGENT_FILE), &settings, 0o644)?;
    println!(
        "{}\nTesting agent connection.\nSettings Saved.",
        if replaced {
            "Successfully replaced the agent"
        } else {
            "Successfully added the agent"
        }
    );
    diag::event(
        &ctx.root,
        "configured",
        json!({
            "agentId": agent_id,
            "agentName": agent_name,
            "poolId": pool_id,
            "poolName": pool_name,
            "replaced": replaced,
            "keyCreated": key_created,
            "capabilityNames": capabilities.keys().collect::<Vec<_>>(),
            "envInputs": cmd.env_input_names(),
            "argv": ctx.masked_argv(),
        }),
    );
    Ok(())
}

/// Validates `--auth` (only PAT is supported) and builds the client; returns the token.
pub(super) fn connect(
    ctx: &Context,
    cmd: &CommandLine,
    url: &str,
) -> Result<(Client, String), StandinError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        StandinError::Usage(format!("--url '{url}' is not a valid URL ({e}); pass the organization URL, e.g. https://dev.azure.com/org"))
    })?;
    // GetCredentialProvider: PAT by default for https URLs whose host looks like a FQDN.
    let default_auth =
        if parsed.scheme() == "https" && parsed.host_str().is_some_and(|h| h.contains('.')) {
            "pat"
        } else {
            "negotiate"
        };
    let auth = cmd.required("auth", Some(default_auth))?;
    if !auth.eq_ignore_ascii_case("pat") {
        return Err(StandinError::Usage(format!(
            "Authentication type '{auth}' is not supported by the stand-in agent; use --auth pat"
        )));
    }
    let token = cmd.required("token", None)?;
    Ok((Client::new(ctx, url)?, token))
}

async fn find_pool(client: &Client, auth: &Auth, name: &str) -> Result<Value, StandinError> {
    let resp = client
        .call(
            "get pools",
            Method::GET,
            "/_apis/distributedtask/pools",
            &[("poolName", name.to_string())],
            API_VERSION,
            auth,
            None,
        )
        .await?;
    first_of_list(&resp.body, "get pools")?
        .ok_or_else(|| StandinError::PoolNotFound(name.to_string()))
}

/// The agent of that name in the pool, if any (`GetAgentAsync`).
pub(super) async fn find_agent(
    client: &Client,
    auth: &Auth,
    pool_id: u64,
    name: &str,
) -> Result<Option<Value>, StandinError> {
    let resp = client
        .call(
            "get agents",
            Method::GET,
            &format!("/_apis/distributedtask/pools/{pool_id}/agents"),
            &[
                ("agentName", name.to_string()),
                ("includeCapabilities", "true".to_string()),
            ],
            API_VERSION,
            auth,
            None,
        )
        .await?;
    Ok(first_of_list(&resp.body, "get agents")?.filter(|a| {
        a.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n.eq_ignore_ascii_case(name))
    }))
}

fn first_of_list(body: &Value, call: &'static str) -> Result<Option<Value>, StandinError> {
    let list =
        body.get("value")
            .and_then(Value::as_array)
            .ok_or_else(|| StandinError::Protocol {
                call,
                message: "expected {\"count\",\"value\":[...]}".into(),
            })?;
    Ok(list.first().cloned())
}

pub(super) fn id_of(v: &Value, what: &'static str) -> Result<u64, StandinError> {
    v.get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| StandinError::Protocol {
            call: what,
            message: format!("the {what} has no numeric id"),
        })
}

/// The agent's OAuth access token: `client_credentials` grant with a JWT signed by the agent key.
pub(super) async fn access_token(
    client: &Client,
    credentials: &CredentialData,
    key: &RsaParams,
) -> Result<(String, std::time::Duration), StandinError> {
    let bad = |m: &str| StandinError::BadFile {
        path: files::CREDENTIALS_FILE.into(),
        message: m.to_string(),
    };
    if !credentials.scheme.eq_ignore_ascii_case("OAuth") {
        return Err(bad("scheme is not OAuth"));
    }
    let client_id = credentials
        .get("clientId")
        .ok_or_else(|| bad("no clientId"))?;
    let url = credentials
        .get("authorizationUrl")
        .ok_or_else(|| bad("no authorizationUrl"))?;
    let endpoint = credentials.get("oauthEndpointUrl").unwrap_or(url);
    let pair = key.key_pair()?;
    let assertion = client_assertion(&pair, client_id, url, jiff::Timestamp::now().as_second())?;
    let resp = client
        .post_form(
            "get agent token",
            endpoint,
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &assertion),
            ],
        )
        .await?;
    let token = resp
        .body
        .get("access_token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| StandinError::Protocol {
            call: "get agent token",
            message: "no access_token in the token response".into(),
        })?;
    let lifetime = resp
        .body
        .get("expires_in")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or(3600);
    Ok((token, std::time::Duration::from_secs(lifetime.max(1))))
}
