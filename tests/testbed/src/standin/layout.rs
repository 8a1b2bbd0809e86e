//! The agent install folder: `config.sh`, `run.sh`, `env.sh` shaped like the official `layoutroot` scripts
//! (bash; `run.sh` runs the listener as a child without `exec`, so a SIGTERM sent to `run.sh` does not reach
//! it) and `bin/Agent.Listener`, a symlink to the `azp-testbed` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::StandinError;

const CONFIG_SH: &str = r#"#!/bin/bash
# Stand-in for the Azure Pipelines agent's config.sh (azp-testbed).

user_id="$(id -u)"
if [ $user_id -eq 0 -a -z "$AGENT_ALLOW_RUNASROOT" ]; then
    echo "Must not run with sudo"
    exit 1
fi

SOURCE="${BASH_SOURCE[0]}"
while [ -h "$SOURCE" ]; do
  DIR="$( cd -P "$( dirname "$SOURCE" )" && pwd )"
  SOURCE="$(readlink "$SOURCE")"
  [[ $SOURCE != /* ]] && SOURCE="$DIR/$SOURCE"
done
DIR="$( cd -P "$( dirname "$SOURCE" )" && pwd )"
cd "$DIR"

source ./env.sh

shopt -s nocasematch
if [[ "$1" == "remove" ]]; then
    ./bin/Agent.Listener "$@"
else
    ./bin/Agent.Listener configure "$@"
fi
"#;

const RUN_SH: &str = r#"#!/bin/bash
# Stand-in for the Azure Pipelines agent's run.sh (azp-testbed). Like the real one it runs the listener as
# a child, without exec: a SIGTERM sent to this script does not reach the listener.

user_id=`id -u`
if [ $user_id -eq 0 -a -z "$AGENT_ALLOW_RUNASROOT" ]; then
    echo "Must not run interactively with sudo"
    exit 1
fi

SOURCE="${BASH_SOURCE[0]}"
while [ -h "$SOURCE" ]; do
  DIR="$( cd -P "$( dirname "$SOURCE" )" && pwd )"
  SOURCE="$(readlink "$SOURCE")"
  [[ $SOURCE != /* ]] && SOURCE="$DIR/$SOURCE"
done
DIR="$( cd -P "$( dirname "$SOURCE" )" && pwd )"

shopt -s nocasematch
if [[ "$1" == "localRun" ]]; then
    "$DIR"/bin/Agent.Listener $*
else
    "$DIR"/bin/Agent.Listener run $*
    returnCode=$?
    exit $returnCode
fi
"#;

const ENV_SH: &str = r#"#!/bin/bash
# Stand-in for the Azure Pipelines agent's env.sh: snapshots a few variables into .env and PATH into .path.

varCheckList=(
    'LANG'
    'JAVA_HOME'
    'ANT_HOME'
    'M2_HOME'
    'ANDROID_HOME'
    'GRADLE_HOME'
    'NVM_BIN'
    'NVM_PATH'
    'VSTS_HTTP_PROXY'
    'VSTS_HTTP_PROXY_USERNAME'
    'VSTS_HTTP_PROXY_PASSWORD'
    'LD_LIBRARY_PATH'
    'PERL5LIB'
    'AGENT_TOOLSDIRECTORY'
    )

envContents=""

if [ -f ".env" ]; then
    envContents=`cat .env`
else
    touch .env
fi

function writeVar()
{
    checkVar="$1"
    checkDelim="${1}="
    if test "${envContents#*$checkDelim}" = "$envContents"
    then
        if [ ! -z "${!checkVar}" ]; then
            echo "${checkVar}=${!checkVar}">>.env
        fi
    fi
}

echo $PATH>.path

for var_name in ${varCheckList[@]}
do
    writeVar "${var_name}"
done
"#;

/// Lays out a stand-in agent install folder in `dir` (created if needed). `listener` is the `azp-testbed`
/// binary `bin/Agent.Listener` links to; `None` uses the current executable. Returns `dir`.
pub fn layout(dir: &Path, listener: Option<&Path>) -> Result<PathBuf, StandinError> {
    let io = |path: &Path, e| StandinError::Io {
        path: path.to_owned(),
        source: e,
    };
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| io(&bin, e))?;
    for (name, text) in [
        ("config.sh", CONFIG_SH),
        ("run.sh", RUN_SH),
        ("env.sh", ENV_SH),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(&path, e))?;
    }
    let target = match listener {
        Some(p) => p.to_owned(),
        None => std::env::current_exe().map_err(|e| io(Path::new("current_exe"), e))?,
    };
    let target = std::path::absolute(&target).map_err(|e| io(&target, e))?;
    let link = bin.join("Agent.Listener");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).map_err(|e| io(&link, e))?;
    }
    std::os::unix::fs::symlink(&target, &link).map_err(|e| io(&link, e))?;
    Ok(dir.to_owned())
}

/// Appends `KEY=VALUE` lines to the agent folder's `.env`, which the listener loads at start (as the real
/// agent does). Use it for the stand-in's knobs (`STANDIN_*`) when an entrypoint under test clears the
/// listener's environment.
pub fn append_dot_env(dir: &Path, vars: &[(&str, &str)]) -> Result<(), StandinError> {
    use std::io::Write;
    let path = dir.join(".env");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| StandinError::Io {
            path: path.clone(),
            source: e,
        })?;
    for (key, value) in vars {
        if key.is_empty() || key.contains('=') || key.contains('\n') || value.contains('\n') {
            return Err(StandinError::Usage(format!(
                ".env entry {key:?} must be a name without '=' or newlines and a one-line value"
            )));
        }
        writeln!(file, "{key}={value}").map_err(|e| StandinError::Io {
            path: path.clone(),
            source: e,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_the_scripts_and_a_listener_link() {
        let dir = std::env::temp_dir().join(format!("standin-layout-{}", uuid::Uuid::new_v4()));
        layout(&dir, Some(Path::new("/bin/true"))).expect("layout");
        for name in ["config.sh", "run.sh", "env.sh"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "{name} executable");
        }
        let run = std::fs::read_to_string(dir.join("run.sh")).unwrap();
        assert!(!run.contains("exec "), "run.sh must not exec the listener");
        assert_eq!(
            std::fs::read_link(dir.join("bin/Agent.Listener")).unwrap(),
            PathBuf::from("/bin/true")
        );
        // A second layout over the first replaces the link.
        layout(&dir, Some(Path::new("/bin/false"))).expect("relayout");
        assert_eq!(
            std::fs::read_link(dir.join("bin/Agent.Listener")).unwrap(),
            PathBuf::from("/bin/false")
        );
        append_dot_env(&dir, &[("STANDIN_CANCEL_DELAY_MS", "5")]).expect("append");
        append_dot_env(&dir, &[("B", "2")]).expect("append");
        assert_eq!(
            std::fs::read_to_string(dir.join(".env")).unwrap(),
            "STANDIN_CANCEL_DELAY_MS=5\nB=2\n"
        );
        assert!(append_dot_env(&dir, &[("A=B", "x")]).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
