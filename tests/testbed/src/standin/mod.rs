//! See tests/testbed/README.md.
