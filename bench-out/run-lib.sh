# Shared by the bench-out/run-*.sh scripts: run one command from the repository root, keep its log, show its tail.
AF=.venv/bin/antenna-flows
O=bench-out
TAIL_LINES=${TAIL_LINES:-6}
run() { echo "== $*"; "$@" > "$O/last.log" 2>&1 || echo "   failed: rc=$? (see $O/last.log)"; tail -"$TAIL_LINES" "$O/last.log" | sed 's/^/   /'; }
