# Sourced by the CI scripts: `phase NAME` starts a phase and prints how long the last one took;
# `with_tree_lock CMD...` runs a step that writes into the work tree (pip's in-tree build of the
# project) under .ci/run's lock, CI_TREE_LOCK, where one is set (.ci/run says why).
phase_start=$(date +%s)
phase() {
    local now; now=$(date +%s)
    [ -n "${phase_name:-}" ] && echo "== phase '${phase_name}' took $((now - phase_start)) s"
    phase_name=$1; phase_start=$now
    [ -n "$phase_name" ] && echo "== phase '${phase_name}'"
    return 0
}
with_tree_lock() { if [ -n "${CI_TREE_LOCK:-}" ]; then flock "$CI_TREE_LOCK" "$@"; else "$@"; fi; }
