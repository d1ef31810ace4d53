# Sourced by the CI scripts: `phase NAME` starts a phase and prints how long the last one took.
phase_start=$(date +%s)
phase() {
    local now; now=$(date +%s)
    [ -n "${phase_name:-}" ] && echo "== phase '${phase_name}' took $((now - phase_start)) s"
    phase_name=$1; phase_start=$now
    [ -n "$phase_name" ] && echo "== phase '${phase_name}'"
    return 0
}
