//! Checks of deploy/ that need no container engine and no cluster:
//! - `image`: the image's build stage, assembled from the checkout exactly as
//!   deploy/Dockerfile.dockerignore and the Dockerfile's `COPY`s assemble it, builds both
//!   binaries; docker-compose.yml builds with that Dockerfile from the repository root;
//! - `kubernetes`: the kustomizations render every container with their image, every object
//!   validates against the Kubernetes API schemas, the agents' probes reach their health port;
//! - `systemd`: `systemd-analyze verify` prints nothing about the agent's unit;
//! - `argv`: no password or password-bearing URL on a command line, and only flags the
//!   binaries have.
//!
//! Run with `cargo test -p pgzm-tests --test deploy`. The tools (kubectl, systemd-analyze,
//! kubernetes-validate in a virtualenv) are installed by `./dev/test` and `.ci/run`
//! (`ensure_deploy_tools` in dev/lib.sh); a missing tool fails its test with how to install
//! it. The first run builds the binaries in their own target directory (a few minutes); later
//! runs are incremental.

mod argv;
mod dockerfile;
mod dockerignore;
mod image;
mod kubernetes;
mod systemd;
mod tools;
