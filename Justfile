# tproxy recipes. On a fresh machine run them through ./scripts/just, which builds .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# List the recipes
default:
    @just --list

# Install the Debian packages tproxy needs when missing (iptables, nftables, iproute2)
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v iptables-restore >/dev/null || need+=(iptables)
    command -v nft >/dev/null || need+=(nftables)
    command -v ip >/dev/null || need+=(iproute2)
    command -v setpriv >/dev/null || need+=(util-linux)
    if [ ${#need[@]} -gt 0 ]; then
      if [ "$(id -u)" -ne 0 ]; then echo "just deps: need root to install: ${need[*]}" >&2; exit 1; fi
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      echo "installed: ${need[*]}"
    fi

# Run the self-contained demo in network namespaces (root): the application sees the client's real IP, both modes
demo *args: deps
    tproxy demo {{args}}

# Run the whole test suite; options go to pytest (root-only tests skip elsewhere and say why)
test *args: deps
    pytest {{args}}

# Run only the end-to-end tests in network namespaces (root): mode x backend x family matrix, load, lifecycle, demo
e2e *args: deps
    pytest tests/test_e2e.py tests/test_e2e_load.py tests/test_e2e_lifecycle.py tests/test_demo.py {{args}}

# Preflight this host for a config (root): one PASS/FAIL line per check, each failure with its fix
check config="conf/tproxy.toml": deps
    tproxy check -c {{config}}

# Check lint and formatting without changing anything
lint:
    ruff check .
    ruff format --check .

# Rewrite formatting and fix what ruff can fix
fix:
    ruff format .
    ruff check --fix .

# Regenerate the golden rule files under tests/golden from the renderers
golden:
    python -m tests.golden_gen

# Install the benchmark's Debian packages when missing (iperf3, wrk, haproxy, nginx-light)
bench-deps: deps
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v wrk >/dev/null || need+=(wrk)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx-light)
    if [ ${#need[@]} -gt 0 ]; then
      if [ "$(id -u)" -ne 0 ]; then echo "just bench-deps: need root to install: ${need[*]}" >&2; exit 1; fi
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      echo "installed: ${need[*]}"
    fi

# Benchmark (root): direct, HAProxy and tproxy side by side in namespaces; --quick for a short run, --json PATH
bench *args: bench-deps
    python -m tests.bench {{args}}

# Soak (root): mixed load through the real proxy in the lab for N minutes, sampled every 10 s; --minutes N (default
# 10), --relay shared|tasks, --out DIR (soak.csv, soak.png, proxy.log)
soak *args: deps
    python -m tests.soak {{args}}
