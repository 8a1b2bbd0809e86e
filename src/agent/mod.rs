//! The agent container entrypoint: token → register → run one job → deregister.
