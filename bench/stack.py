"""What the benchmark scripts share: building Plane, starting a real stack (plane dev for the
controller and drone, a separate `plane proxy` process to measure alone), a demo backend
container, an nginx reverse proxy to the same container, and reading RSS and load."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANE = os.path.join(ROOT, "target", "release", "plane")
BENCH_CLIENT = os.path.join(ROOT, "target", "release", "plane-bench")


def log(message):
    print(f"# {message}", file=sys.stderr, flush=True)


def require(*commands):
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found; install them (apt-get install {' '.join(missing)})")


def build(debug=False):
    """Builds `plane` and the benchmark client: release for real figures; debug (which the
    test suite has built already) only to check that a script still works."""
    global PLANE, BENCH_CLIENT
    profile = "debug" if debug else "release"
    PLANE = os.path.join(ROOT, "target", profile, "plane")
    BENCH_CLIENT = os.path.join(ROOT, "target", profile, "plane-bench")
    argv = ["cargo", "build", "--quiet", "--bin", "plane", "--bin", "plane-bench"]
    if not debug:
        argv.insert(2, "--release")
    log(" ".join(argv))
    subprocess.run(argv, cwd=ROOT, check=True)


def add_build_options(parser):
    parser.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    parser.add_argument("--debug", action="store_true",
                        help="use the debug build: checks the script works; the figures mean nothing")


def prepare(args):
    """Builds (unless told not to) and points at the binaries the options ask for."""
    if args.no_build:
        global PLANE, BENCH_CLIENT
        profile = "debug" if args.debug else "release"
        PLANE = os.path.join(ROOT, "target", profile, "plane")
        BENCH_CLIENT = os.path.join(ROOT, "target", profile, "plane-bench")
    else:
        build(debug=args.debug)
    if args.debug:
        print("(debug build: these figures only show that the benchmark runs)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def rss_kib(pids):
    """Resident set size of the given processes together, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids):
    """User plus system CPU time the given processes (all their threads) have used."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds():
    """CPU time the whole machine has spent busy (every core, everything but idle and
    I/O wait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds():
    """CPU time of every live process, by pid: (command, own seconds, seconds of the
    children it has reaped). A window's figure counts processes started within it in full."""
    found = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        if name == "plane":
            # Which part: `plane controller`, `plane drone`, the demo backends' `plane demo`...
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                name = f"plane {args[1].decode()}" if len(args) > 1 and args[1] else name
            except OSError:
                pass
        fields = raw.rsplit(")", 1)[1].split()
        found[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / tick,
                             (int(fields[13]) + int(fields[14])) / tick)
    return found


# The Docker engine's processes: the daemons, one shim per container (and runc, which it
# runs: its time is the shim's once the shim has reaped it).
ENGINE_COMMANDS = ("dockerd", "containerd", "docker-proxy")


def cpu_by_command(before, after):
    """CPU seconds per command between two `process_cpu_seconds()` readings, the Docker
    engine's processes (with what they reaped) under one name, most first."""
    spent = {}
    for pid, (name, own, reaped) in after.items():
        _, own_before, reaped_before = before.get(pid, (name, 0.0, 0.0))
        seconds = own - own_before
        if name.startswith(ENGINE_COMMANDS):
            name = "docker engine"
            seconds += reaped - reaped_before
        if seconds > 0:
            spent[name] = spent.get(name, 0.0) + seconds
    return sorted(spent.items(), key=lambda item: -item[1])


def raise_fd_limit(wanted):
    """Raises this process's open-file limit (inherited by what it starts) towards `wanted`,
    the hard limit too where allowed; returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, wanted), wanted))
            hard = wanted
        except (ValueError, OSError):
            pass  # not allowed here (no CAP_SYS_RESOURCE): make do with the hard limit
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_json(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class StartFailed(Exception):
    """Something the benchmark needs did not come up in time."""


def wait_until(what, check, within=60.0):
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as error:  # noqa: BLE001 - reported below if it never succeeds
            last = error
        time.sleep(0.1)
    raise StartFailed(f"timed out waiting for {what} (last seen: {last!r})")


def bridge_address():
    """The host's address on Docker's default bridge (docker0). A port published there is
    reached from this machine through the kernel's DNAT, as from another machine in
    production, rather than through Docker's userland forwarder (docker-proxy), which every
    loopback connection to a published port goes through and which costs more CPU than the
    proxies being measured and resets connections beyond a few thousand."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True).stdout
    for field in out.split():
        if "/" in field and field[0].isdigit():
            return field.split("/")[0]
    return "127.0.0.1"


class Stack:
    """A running plane dev (controller + its drone), a bench drone publishing backends on
    the Docker bridge address, a separate plane proxy, and backends on the bench drone."""

    def __init__(self, scratch, proxy_args=()):
        self.scratch = scratch
        self.processes = []
        try:
            self._start(scratch, proxy_args)
        except BaseException:
            remove_backends(self)
            self.stop()
            raise

    def _start(self, scratch, proxy_args):
        self.controller_port = free_port()
        self.dev_proxy_port = free_port()
        self.proxy_port = free_port()
        self.cluster = f"localhost:{self.dev_proxy_port}"
        self.controller = f"http://127.0.0.1:{self.controller_port}"
        logs = open(os.path.join(scratch, "plane-dev.log"), "w")
        self.dev = self._spawn(
            [PLANE, "dev", "--data-dir", os.path.join(scratch, "dev"),
             "--controller-port", str(self.controller_port), "--proxy-port", str(self.dev_proxy_port)],
            logs,
        )
        wait_until("plane dev", lambda: http_json("GET", f"{self.controller}/ctrl/c/{self.cluster}/state")
                   .get("drones"), within=180)
        self.backend_ip = bridge_address()
        drone_logs = open(os.path.join(scratch, "plane-drone.log"), "w")
        self._spawn(
            [PLANE, "drone", "--controller-url", self.controller, "--cluster", self.cluster,
             "--name", "dr-bench", "--pool", "bench", "--ip", self.backend_ip,
             "--state-dir", os.path.join(scratch, "bench-drone")],
            drone_logs,
        )
        wait_until("the bench drone", lambda: any(
            d["node"].get("connected") and d["node"]["name"] == {"Drone": "dr-bench"}
            for d in http_json("GET", f"{self.controller}/ctrl/c/{self.cluster}/state")["drones"]))
        proxy_logs = open(os.path.join(scratch, "plane-proxy.log"), "w")
        self.proxy = self._spawn(
            [PLANE, "proxy", "--controller-url", self.controller, "--cluster", self.cluster,
             "--bind-ip", "127.0.0.1", "--http-port", str(self.proxy_port), *proxy_args],
            proxy_logs,
        )
        wait_until("the proxy to connect", self._proxy_connected)

    def _spawn(self, argv, logs):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        process = subprocess.Popen(argv, stdout=logs, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def _proxy_connected(self):
        state = http_json("GET", f"{self.controller}/ctrl/c/{self.cluster}/state")
        return sum(1 for p in state.get("proxies", []) if p.get("connected")) >= 2

    def backend(self, key):
        """Connects `key` to the demo image; returns (token, published host:port) once ready."""
        response = http_json("POST", f"{self.controller}/ctrl/connect", {
            "key": {"name": key},
            "spawn_config": {"pool": "bench", "executable": {"image": "plane/demo:latest"},
                             "max_idle_seconds": 3600},
        })
        backend = response["backend_id"]
        wait_until(f"backend {backend} to be ready",
                   lambda: http_json("GET", f"{self.controller}/pub/b/{backend}/status")["status"] == "ready")
        container = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label=dev.plane.backend={backend}"],
            check=True, capture_output=True, text=True).stdout.split()[0]
        port = subprocess.run(["docker", "port", container], check=True, capture_output=True,
                              text=True).stdout.split("\n")[0].split(" -> ")[1].strip()
        if port.startswith("0.0.0.0:"):
            port = f"{self.backend_ip}:{port.split(':')[1]}"
        return response["token"], port, backend, response["secret_token"]

    def proxy_url(self, token, path):
        return f"http://127.0.0.1:{self.proxy_port}/{token}{path}"

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


class Nginx:
    """Debian's nginx as a reverse proxy to `upstream`, with upstream keep-alive, configured
    the way a user would put it in front of a container (no access log, 2 workers). It adds
    headers of the same names and sizes as Plane's verified and forwarding headers, so the
    backend receives (and its echo returns) the same bytes on both paths."""

    def __init__(self, scratch, upstream, backend_id="ba-00000000000000000", secret="s" * 32,
                 fd_limit=20000):
        self.port = free_port()
        prefix = os.path.join(scratch, "nginx")
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {fd_limit};
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream backend {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Verified-User-Data "{{}}";
            proxy_set_header X-Verified-Secret "{secret}";
            proxy_set_header X-Verified-Backend "{backend_id}";
            proxy_set_header X-Verified-Path $request_uri;
            proxy_read_timeout 3600s;
        }}
    }}
}}
""")
        self.process = subprocess.Popen(["nginx", "-c", conf, "-p", prefix],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until("nginx", lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True)

    def pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [self.process.pid] + [int(p) for p in out.split()]

    def stop(self):
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextmanager
def scratch_dir(name):
    path = tempfile.mkdtemp(prefix=f"plane-bench-{name}-")
    ok = False
    try:
        yield path
        ok = True
    finally:
        if ok and not os.environ.get("PLANE_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            log(f"logs kept in {path}")


def remove_backends(stack):
    """Hard-terminates the stack's backends so no container outlives the benchmark."""
    try:
        out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=dev.plane.cluster={stack.cluster}"],
                             capture_output=True, text=True).stdout.split()
        if out:
            subprocess.run(["docker", "rm", "-f", *out], capture_output=True)
    except OSError:
        pass


WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output):
    """(requests/s, p50 ms, p99 ms, errors) from `wrk --latency` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))

    def percentile(p):
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * WRK_UNITS[unit]

    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        errors += int(match.group(1))
    return rps, percentile(50), percentile(99), errors


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class ConnectController:
    """A controller and `drones` drones of its own, from `binary`, with the connect
    benchmark's key's backend running (bench/connect, bench/scale)."""

    def __init__(self, name, binary, db, scratch, ours, drones=1):
        self.name = name
        self.processes = []
        self.backend = None
        try:
            self._start(binary, db, scratch, ours, drones)
        except BaseException:
            # Not yet in the caller's list, so nothing else would stop what did start.
            self.stop()
            raise

    def _start(self, binary, db, scratch, ours, drones):
        name = self.name
        port = free_port()
        self.cluster = f"localhost:{free_port()}"
        self.url = f"http://127.0.0.1:{port}"
        logs = os.path.join(scratch, name)
        os.makedirs(logs)
        self._spawn([binary, "controller", "--db", db, "--port", str(port), "--default-cluster", self.cluster],
                    os.path.join(logs, "controller.log"))
        wait_until(f"{name}'s controller", lambda: http_json("GET", f"{self.url}/pub/health"), within=60)
        for i in range(drones):
            suffix = "" if drones == 1 else f"-{i}"
            drone = [binary, "drone", "--controller-url", self.url, "--cluster", self.cluster,
                     "--name", "dr-" + name.replace(".", "") + suffix]
            if ours:
                drone += ["--state-dir", os.path.join(logs, f"drone-state{suffix}"), "--log-retention-seconds", "0",
                          "--on-shutdown", "terminate"]
            self._spawn(drone, os.path.join(logs, f"drone{suffix}.log"))
        wait_until(f"{name}'s drones", lambda: sum(
            1 for d in http_json("GET", f"{self.url}/ctrl/c/{self.cluster}/state")["drones"] if d.get("ready")
        ) == drones, within=60)
        response = http_json("POST", f"{self.url}/ctrl/connect", self.body())
        self.backend = response["backend_id"]
        wait_until(f"{name}'s backend to be ready", lambda: http_json(
            "GET", f"{self.url}/pub/b/{self.backend}/status")["status"] == "ready", within=120)

    @staticmethod
    def body():
        return {"key": {"name": CONNECT_KEY}, "spawn_config": {"executable": {"image": DEMO_IMAGE}}}

    def _spawn(self, argv, log):
        env = dict(os.environ, RUST_LOG="warn")
        with open(log, "w") as out:
            self.processes.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL))

    def pids(self):
        return [p.pid for p in self.processes]

    def stop(self):
        try:
            if self.backend is None:
                raise RuntimeError("no backend was started")
            http_json("POST", f"{self.url}/ctrl/b/{self.backend}/hard-terminate")
            wait_until(f"{self.name}'s backend to stop", lambda: http_json(
                "GET", f"{self.url}/pub/b/{self.backend}/status")["status"] == "terminated", within=30)
        except Exception as err:  # noqa: BLE001 - best effort; the drone is stopped next anyway
            log(f"{self.name}: could not stop its backend: {err}")
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

CONNECT_KEY = "bench-connect"
CONNECT_CONNECTIONS = 16
DEMO_IMAGE = "plane/demo:latest"


def connect_script(scratch):
    """A wrk script that POSTs the connect benchmark's connect; its path."""
    script = os.path.join(scratch, "connect.lua")
    body = json.dumps(ConnectController.body(), separators=(",", ":"))
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = '{body}'\n")
    return script


def connect_wrk(controller, seconds, script):
    """(requests/s, p50 ms, p99 ms, errors) of `seconds` of connects at 16 connections."""
    argv = ["wrk", "-t2", f"-c{CONNECT_CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", script,
            f"{controller.url}/ctrl/connect"]
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return parse_wrk(output)
