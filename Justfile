# tproxy recipes. On a fresh machine run them through ./scripts/just, which builds .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# List the recipes
default:
    @just --list

# Install the Debian packages tproxy and its tests need when missing (iptables, nftables, iproute2, util-linux,
# haproxy, nginx-light, dnsmasq, kdig)
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v iptables-restore >/dev/null || need+=(iptables)
    command -v nft >/dev/null || need+=(nftables)
    command -v ip >/dev/null || need+=(iproute2)
    command -v setpriv >/dev/null || need+=(util-linux)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx-light)
    command -v dnsmasq >/dev/null || need+=(dnsmasq-base)  # the UDP tests' DNS server (the binary, no service)
    command -v kdig >/dev/null || need+=(knot-dnsutils)
    command -v conntrack >/dev/null || need+=(conntrack)  # the tests read the node namespace's conntrack table
    if [ ${#need[@]} -gt 0 ]; then
      if [ "$(id -u)" -ne 0 ]; then echo "just deps: need root to install: ${need[*]}" >&2; exit 1; fi
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      echo "installed: ${need[*]}"
    fi

# Install what `just image` needs when missing (mmdebstrap, podman, runc)
image-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v podman >/dev/null || need+=(podman)
    command -v runc >/dev/null || need+=(runc)
    if [ ${#need[@]} -gt 0 ]; then
      if [ "$(id -u)" -ne 0 ]; then echo "just image-deps: need root to install: ${need[*]}" >&2; exit 1; fi
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      echo "installed: ${need[*]}"
    fi

# Build the container image (root): a Debian base by mmdebstrap, `podman import`, conf/Containerfile on top, offline
image tag="localhost/tproxy:latest": image-deps
    #!/usr/bin/env bash
    set -euo pipefail
    out=build/image
    rm -rf "$out" && mkdir -p "$out/context"
    pip wheel --quiet --wheel-dir "$out/context/wheels" .
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-venv,nftables,iptables,iproute2,libcap2-bin \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      bookworm "$out/base.tar"
    podman import --quiet "$out/base.tar" localhost/tproxy-base:bookworm >/dev/null
    rm "$out/base.tar"
    # runc and low limits: crun and podman's default limits need cgroup v2 and CAP_SYS_RESOURCE (not on our machines)
    podman build --quiet --layers=false --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network none \
      --build-arg BASE=localhost/tproxy-base:bookworm -f conf/Containerfile -t {{tag}} "$out/context"
    echo "built {{tag}}"

# Run the self-contained demo in network namespaces (root): the application sees the client's real IP, both modes
demo *args: deps
    tproxy demo {{args}}

# Run the whole test suite; options go to pytest (root-only tests skip elsewhere and say why)
test *args: deps
    pytest {{args}}

# Build the container image and test it (root, minutes): the tests marked `image`, left out of `just test`
test-image *args: deps image-deps
    pytest -m image tests/test_image.py {{args}}

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

# Install the benchmark's Debian packages when missing (iperf3, wrk, haproxy, nginx-light; for --udp dnsperf,
# libnginx-mod-stream, and gcc + libc6-dev for nginx's IP_TRANSPARENT shim)
bench-deps: deps
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v wrk >/dev/null || need+=(wrk)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx-light)
    command -v dnsperf >/dev/null || need+=(dnsperf)
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
    command -v gcc >/dev/null || need+=(gcc)
    [ -e /usr/include/dlfcn.h ] || need+=(libc6-dev)
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
