//! A local test CA and server certificates.
