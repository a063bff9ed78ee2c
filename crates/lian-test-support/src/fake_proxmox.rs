//! A strict local fake of the Proxmox VE API (the parts lian uses), written from its
//! published reference (api-viewer; qemu-server, pve-manager and pve-http-server): API
//! token auth (`Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`, 401 otherwise),
//! `{"data": ...}` answers, errors as an HTTP status whose reason line and body `message`
//! carry the text, 400 `{"errors": {param: message}}` for parameter errors (unknown
//! parameters included), form-encoded POST/PUT bodies, DELETE/GET parameters in the query,
//! tasks (UPIDs) polled on `/nodes/{node}/tasks/{upid}/status`, `/cluster/nextid`,
//! `/cluster/resources`, clone/config/start/stop/delete of QEMU VMs and the guest agent
//! (`network-get-interfaces`, `file-write`, `exec`, `exec-status`). Behaviour knobs make it
//! slow, out of storage, refuse the clone, never start its guest agent, or fail once. An axum
//! router (`serve.rs`): the transport's checks in middleware, the parameters through one
//! extractor (`PveParams`), each endpoint a handler.
//!
//! One node (`pve1`) with one template (VMID 9000, protected), one pool (`ci`) and two
//! storages (`local-lvm`, `fast`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Form, FromRequest, FromRequestParts, Path, Query, Request, State as Shared};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, TRANSFER_ENCODING};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::serve::Served;

#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Polls of a task before it stops.
    pub task_polls: u32,
    /// Clone tasks end with LVM's "insufficient free space" error, as on a full storage.
    pub storage_full: bool,
    /// `POST .../clone` answers 403 "Permission check failed".
    pub clone_forbidden: bool,
    /// The guest agent never starts: agent calls answer 500 "QEMU guest agent is not running".
    pub agent_never_ready: bool,
    /// The first authenticated request is answered 503.
    pub flaky_first: bool,
    /// The IPv4 address the guest agent reports on eth0 (none when empty).
    pub ip: String,
}

/// A VM of the fake, as a test would check it.
#[derive(Debug, Clone, Default)]
pub struct FakeVm {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub status: String,
    pub template: bool,
    pub lock: Option<String>,
    pub pool: Option<String>,
    pub storage: Option<String>,
    pub full: bool,
    pub cores: u32,
    /// MiB.
    pub memory: u32,
    pub tags: Vec<String>,
    pub description: String,
    pub ciuser: String,
    /// As stored by Proxmox (URL-encoded).
    pub sshkeys: String,
    /// Decoded: the public keys cloud-init installs.
    pub sshkeys_decoded: String,
    pub ipconfig0: String,
    pub agent: String,
    /// Files written through the guest agent: path -> content.
    pub files: BTreeMap<String, String>,
    /// Commands run through the guest agent.
    pub execs: Vec<Vec<String>>,
}

#[derive(Clone, Copy)]
enum TaskKind {
    Clone { vmid: u32 },
    Config,
    Start { vmid: u32 },
    Stop { vmid: u32 },
    Destroy { vmid: u32 },
}

struct Task {
    kind: TaskKind,
    polls_left: u32,
    exitstatus: Option<String>,
}

#[derive(Default)]
struct State {
    vms: BTreeMap<u32, FakeVm>,
    tasks: BTreeMap<String, Task>,
    requests: Vec<String>,
    flaky_served: bool,
    seq: u32,
}

pub struct FakeProxmox {
    /// `http://127.0.0.1:<port>/api2/json`
    pub url: String,
    pub token_id: String,
    pub token_secret: String,
    pub node: String,
    pub template_vmid: u32,
    state: Arc<Mutex<State>>,
    _served: Served,
}

/// What every handler shares.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    behaviour: Arc<Behaviour>,
    token_id: Arc<str>,
    token_secret: Arc<str>,
}

impl Fake {
    /// The state, locked for one request, and the knobs.
    fn lock(&self) -> (MutexGuard<'_, State>, &Behaviour) {
        (self.state.lock().unwrap(), &self.behaviour)
    }
}

/// The API token that authenticated the request (tasks are its).
#[derive(Clone)]
struct User(String);

const NODE: &str = "pve1";
const TEMPLATE: u32 = 9000;
const POOLS: [&str; 1] = ["ci"];
const STORAGES: [&str; 2] = ["local-lvm", "fast"];
const BASE: &str = "/api2/json";

/// A Proxmox answer: a status and its JSON body (`IntoResponse` below).
struct Reply(u16, Value);

impl FakeProxmox {
    pub fn start(behaviour: Behaviour) -> Self {
        let token_id = "lian@pve!workers".to_string();
        let token_secret = "5f0c1d2e-7a3b-4c5d-9e8f-0123456789ab".to_string();
        let mut state = State::default();
        state.vms.insert(
            TEMPLATE,
            FakeVm {
                vmid: TEMPLATE,
                name: "lian-runner-template".into(),
                node: NODE.into(),
                status: "stopped".into(),
                template: true,
                cores: 2,
                memory: 2048,
                description: "buildkitd, buildctl, cloud-init, qemu-guest-agent".into(),
                agent: "1".into(),
                ..Default::default()
            },
        );
        let state = Arc::new(Mutex::new(state));
        let fake = Fake {
            state: state.clone(),
            behaviour: Arc::new(behaviour),
            token_id: token_id.as_str().into(),
            token_secret: token_secret.as_str().into(),
        };
        let served = Served::start(router(fake));
        Self {
            url: format!("http://{}{BASE}", served.addr),
            token_id,
            token_secret,
            node: NODE.into(),
            template_vmid: TEMPLATE,
            state,
            _served: served,
        }
    }

    /// The VMs cloned so far (the template is not listed).
    pub fn vms(&self) -> Vec<FakeVm> {
        let st = self.state.lock().unwrap();
        st.vms.values().filter(|v| !v.template).cloned().collect()
    }

    /// Whether the template is still there, untouched.
    pub fn template_intact(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.vms.get(&TEMPLATE).is_some_and(|t| t.template && t.lock.is_none())
    }

    /// Every request as `METHOD /path` (decoded, without the query), in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// A Proxmox error: the message goes in the reason line and the body.
fn fail(status: u16, message: &str) -> Reply {
    Reply(status, json!({"data": null, "message": format!("{message}\n")}))
}

fn param_fail<K: AsRef<str>>(errors: &[(K, String)]) -> Reply {
    let map: serde_json::Map<String, Value> = errors
        .iter()
        .map(|(k, v)| (k.as_ref().to_string(), Value::String(format!("{v}\n"))))
        .collect();
    Reply(
        400,
        json!({"data": null, "errors": map, "message": "Parameter verification failed.\n"}),
    )
}

fn ok(data: Value) -> Reply {
    Reply(200, json!({ "data": data }))
}

/// The parameters of a request, checked against the endpoint's schema: unknown and missing
/// ones are refused like Proxmox does; only `arrays` may repeat.
struct Params(BTreeMap<String, Vec<String>>);

impl Params {
    fn check(raw: Vec<(String, String)>, allowed: &[&str], required: &[&str], arrays: &[&str]) -> Result<Self, Reply> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in raw {
            map.entry(k).or_default().push(v);
        }
        let mut errors = Vec::new();
        for (k, v) in &map {
            if !allowed.contains(&k.as_str()) {
                errors.push((
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties".to_string(),
                ));
            } else if v.len() > 1 && !arrays.contains(&k.as_str()) {
                errors.push((k.clone(), "value given more than once".to_string()));
            }
        }
        for r in required {
            if !map.contains_key(*r) {
                errors.push((r.to_string(), "property is missing and it is not optional".to_string()));
            }
        }
        if errors.is_empty() {
            Ok(Self(map))
        } else {
            Err(param_fail(&errors))
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(|v| v.first()).map(String::as_str)
    }

    fn all(&self, k: &str) -> Vec<String> {
        self.0.get(k).cloned().unwrap_or_default()
    }
}

fn boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Proxmox's `dns-name` format, with DNS's 63-character labels.
fn dns_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn tag_ok(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'))
}

fn urlencoded_ok(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || "-%_.!~*'()".contains(c))
}

/// Starts a task of `kind` (its UPID names `kind_name`, the object `id` and the `user`),
/// polled `polls` times before it stops; answers its UPID.
fn start_task(st: &mut State, kind_name: &str, id: &str, user: &str, kind: TaskKind, polls: u32) -> Reply {
    st.seq += 1;
    let upid = format!(
        "UPID:{NODE}:{:08X}:{:08X}:{:08X}:{kind_name}:{id}:{user}:",
        0x1000 + st.seq,
        0x00A0_0000 + st.seq,
        0x6700_0000 + st.seq
    );
    let task = Task {
        kind,
        polls_left: polls,
        exitstatus: None,
    };
    st.tasks.insert(upid.clone(), task);
    ok(upid.into())
}

fn vm_json(vm: &FakeVm) -> Value {
    let mut v = json!({
        "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid, "name": vm.name,
        "node": vm.node, "status": vm.status, "template": u8::from(vm.template),
        "maxcpu": vm.cores, "maxmem": u64::from(vm.memory) * 1024 * 1024, "maxdisk": 10_737_418_240u64,
        "cpu": 0, "mem": 0, "disk": 0, "uptime": 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
    });
    if !vm.tags.is_empty() {
        v["tags"] = vm.tags.join(";").into();
    }
    if let Some(pool) = &vm.pool {
        v["pool"] = pool.clone().into();
    }
    if let Some(lock) = &vm.lock {
        v["lock"] = lock.clone().into();
    }
    v
}

fn no_config(vmid: u32) -> Reply {
    fail(
        500,
        &format!("Configuration file 'nodes/{NODE}/qemu-server/{vmid}.conf' does not exist"),
    )
}

async fn nextid(Call { fake, params, .. }: Call) -> Reply {
    let (st, _) = fake.lock();
    let p = match Params::check(params, &["vmid"], &[], &[]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    if let Some(want) = p.get("vmid") {
        return match want.parse::<u32>() {
            Ok(id) if st.vms.contains_key(&id) => param_fail(&[("vmid", format!("VM {id} already exists"))]),
            Ok(id) => ok(Value::String(id.to_string())),
            Err(_) => param_fail(&[("vmid", "type check ('integer') failed".into())]),
        };
    }
    let free = (100..).find(|i| !st.vms.contains_key(i)).unwrap();
    // Proxmox answers the integer as a JSON string.
    ok(Value::String(free.to_string()))
}

async fn resources(Call { fake, params, .. }: Call) -> Reply {
    let (st, _) = fake.lock();
    let p = match Params::check(params, &["type"], &[], &[]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    match p.get("type") {
        None | Some("vm") => ok(Value::Array(st.vms.values().map(vm_json).collect())),
        Some("node" | "storage" | "pool" | "sdn") => ok(json!([])),
        Some(other) => param_fail(&[(
            "type",
            format!("value '{other}' does not have a value in the enumeration 'vm, storage, node, sdn, pool'"),
        )]),
    }
}

async fn task_status(PvePath(TaskPath { upid }): PvePath<TaskPath>, Call { fake, user, params }: Call) -> Reply {
    let (mut st, b) = fake.lock();
    if let Err(e) = Params::check(params, &[], &[], &[]) {
        return e;
    }
    let Some(task) = st.tasks.get_mut(&upid) else {
        return fail(500, &format!("unable to parse worker upid '{upid}'"));
    };
    task.polls_left = task.polls_left.saturating_sub(1);
    let running = task.polls_left > 0;
    if let Some(kind) = (!running && task.exitstatus.is_none()).then_some(task.kind) {
        let exit = finish(&kind, &mut st, b);
        st.tasks.get_mut(&upid).unwrap().exitstatus = Some(exit);
    }
    let task = &st.tasks[&upid];
    let mut v = json!({"upid": upid, "node": NODE, "user": user, "pid": 4242, "pstart": 123,
                       "starttime": 1_700_000_000, "type": upid.split(':').nth(5).unwrap_or(""),
                       "id": upid.split(':').nth(6).unwrap_or(""),
                       "status": if running { "running" } else { "stopped" }});
    if let Some(exit) = &task.exitstatus {
        v["exitstatus"] = exit.clone().into();
    }
    ok(v)
}

/// The parameters `POST .../clone` and `POST|PUT .../config` take.
#[rustfmt::skip]
const CLONE_PARAMS: [&str; 10] = ["newid", "name", "description", "pool", "snapname", "storage", "format", "full", "target", "bwlimit"];
#[rustfmt::skip]
const CONFIG_PARAMS: [&str; 13] = [
    "cores", "memory", "ciuser", "sshkeys", "ipconfig0", "tags", "description",
    "agent", "name", "sockets", "digest", "delete", "skiplock",
];

async fn clone_vm(PvePath(Vm { vmid }): PvePath<Vm>, Call { fake, user, params }: Call) -> Reply {
    let (mut st, b) = fake.lock();
    let p = match Params::check(params, &CLONE_PARAMS, &["newid"], &[]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let Ok(newid) = p.get("newid").unwrap().parse::<u32>() else {
        return param_fail(&[("newid", "type check ('integer') failed".into())]);
    };
    if !(100..=999_999_999).contains(&newid) {
        return param_fail(&[("newid", format!("invalid format - value '{newid}' is not in range"))]);
    }
    if let Some(name) = p.get("name")
        && !dns_name_ok(name)
    {
        return param_fail(&[("name", "value does not look like a valid DNS name".into())]);
    }
    let full = match p.get("full").map(boolean) {
        None => false,
        Some(Some(f)) => f,
        Some(None) => return param_fail(&[("full", "type check ('boolean') failed".into())]),
    };
    if let Some(d) = p.get("description")
        && d.len() > 8192
    {
        return param_fail(&[("description", "value may only be 8192 characters long".into())]);
    }
    if b.clone_forbidden {
        return fail(403, &format!("Permission check failed (/vms/{newid}, VM.Allocate)"));
    }
    let Ok(source) = vmid.parse::<u32>() else {
        return param_fail(&[("vmid", "type check ('integer') failed".into())]);
    };
    let Some(src) = st.vms.get(&source) else {
        return no_config(source);
    };
    if !src.template {
        return fail(
            500,
            &format!("VM {source} is not a template (this fake clones templates only)"),
        );
    }
    if let Some(pool) = p.get("pool")
        && !POOLS.contains(&pool)
    {
        return fail(500, &format!("pool '{pool}' does not exist"));
    }
    if let Some(storage) = p.get("storage") {
        if !STORAGES.contains(&storage) {
            return fail(500, &format!("storage '{storage}' does not exist"));
        }
        if !full {
            return fail(500, "parameter 'storage' not allowed for linked clones");
        }
    }
    if st.vms.contains_key(&newid) {
        return fail(500, &format!("unable to create VM {newid}: config file already exists"));
    }
    let clone = FakeVm {
        vmid: newid,
        name: p
            .get("name")
            .map(String::from)
            .unwrap_or(format!("Copy-of-VM-{}", src.name)),
        node: NODE.into(),
        status: "stopped".into(),
        lock: Some("clone".into()),
        pool: p.get("pool").map(String::from),
        storage: p.get("storage").map(String::from),
        full,
        description: p.get("description").unwrap_or("").to_string(),
        ..src.clone()
    };
    st.vms.insert(
        newid,
        FakeVm {
            template: false,
            ..clone
        },
    );
    start_task(
        &mut st,
        "qmclone",
        &source.to_string(),
        &user,
        TaskKind::Clone { vmid: newid },
        b.task_polls,
    )
}

async fn read_config(PvePath(Vm { vmid }): PvePath<Vm>, Call { fake, params, .. }: Call) -> Reply {
    let (st, _) = fake.lock();
    if let Err(e) = Params::check(params, &["current", "snapshot"], &[], &[]) {
        return e;
    }
    let Some(vm) = vmid.parse::<u32>().ok().and_then(|id| st.vms.get(&id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    let mut v = json!({"name": vm.name, "cores": vm.cores, "memory": vm.memory.to_string(),
                       "digest": format!("{:040x}", vm.vmid), "scsi0": format!("local-lvm:vm-{}-disk-0,size=10G", vm.vmid)});
    for (k, val) in [
        ("description", &vm.description),
        ("ciuser", &vm.ciuser),
        ("sshkeys", &vm.sshkeys),
        ("ipconfig0", &vm.ipconfig0),
        ("agent", &vm.agent),
    ] {
        if !val.is_empty() {
            v[k] = val.clone().into();
        }
    }
    if !vm.tags.is_empty() {
        v["tags"] = vm.tags.join(";").into();
    }
    if let Some(lock) = &vm.lock {
        v["lock"] = lock.clone().into();
    }
    if vm.template {
        v["template"] = 1.into();
    }
    ok(v)
}

async fn write_config(m: Method, PvePath(Vm { vmid }): PvePath<Vm>, Call { fake, user, params }: Call) -> Reply {
    let (mut st, b) = fake.lock();
    let p = match Params::check(params, &CONFIG_PARAMS, &[], &[]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let Some(id) = vmid.parse::<u32>().ok().filter(|id| st.vms.contains_key(id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    let mut errors = Vec::new();
    let cores = p.get("cores").map(|c| c.parse::<u32>());
    if let Some(c) = &cores
        && !matches!(c, Ok(1..=128))
    {
        errors.push((
            "cores",
            "value must have a minimum value of 1 and at most 128".to_string(),
        ));
    }
    let memory = p
        .get("memory")
        .map(|m| m.strip_prefix("current=").unwrap_or(m).parse::<u32>());
    if let Some(m) = &memory
        && !matches!(m, Ok(16..=4_194_304))
    {
        errors.push(("memory", "value must be between 16 and 4194304 (MiB)".to_string()));
    }
    let mut sshkeys_decoded = None;
    if let Some(k) = p.get("sshkeys") {
        if !urlencoded_ok(k) {
            errors.push(("sshkeys", format!("invalid urlencoded string: {k}")));
        } else {
            sshkeys_decoded = percent_decode_str(k).decode_utf8().ok().map(|k| k.into_owned());
        }
    }
    if let Some(ip) = p.get("ipconfig0") {
        let good = ip
            .split(',')
            .all(|kv| matches!(kv.split_once('='), Some(("ip" | "gw" | "ip6" | "gw6", v)) if !v.is_empty()));
        if !good {
            errors.push(("ipconfig0", format!("invalid format - format error ({ip})")));
        }
    }
    let tags: Option<Vec<String>> = p.get("tags").map(|t| {
        t.split([';', ',', ' '])
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()
    });
    if let Some(bad) = tags.iter().flatten().find(|t| !tag_ok(t)) {
        errors.push(("tags", format!("invalid format - invalid tag '{bad}'")));
    }
    if let Some(a) = p.get("agent") {
        let v = a.strip_prefix("enabled=").unwrap_or(a);
        if boolean(v.split(',').next().unwrap_or("")).is_none() {
            errors.push(("agent", format!("invalid format - value '{a}' is not a boolean")));
        }
    }
    if let Some(name) = p.get("name")
        && !dns_name_ok(name)
    {
        errors.push(("name", "value does not look like a valid DNS name".to_string()));
    }
    if let Some(d) = p.get("description")
        && d.len() > 8192
    {
        errors.push(("description", "value may only be 8192 characters long".to_string()));
    }
    if !errors.is_empty() {
        return param_fail(&errors);
    }
    if let Some(keys) = &sshkeys_decoded
        && keys
            .lines()
            .filter(|l| !l.trim().is_empty())
            .any(|l| !(l.starts_with("ssh-") || l.starts_with("ecdsa-") || l.starts_with("sk-")))
    {
        return fail(500, "SSH public key validation error");
    }
    let vm = st.vms.get_mut(&id).unwrap();
    if vm.template {
        return fail(500, &format!("VM {id} is a template (this fake changes clones only)"));
    }
    if let Some(lock) = &vm.lock {
        return fail(500, &format!("VM is locked ({lock})"));
    }
    if let Some(Ok(c)) = cores {
        vm.cores = c;
    }
    if let Some(Ok(m)) = memory {
        vm.memory = m;
    }
    if let Some(u) = p.get("ciuser") {
        vm.ciuser = u.into();
    }
    if let (Some(raw), Some(decoded)) = (p.get("sshkeys"), sshkeys_decoded) {
        vm.sshkeys = raw.into();
        vm.sshkeys_decoded = decoded;
    }
    if let Some(ip) = p.get("ipconfig0") {
        vm.ipconfig0 = ip.into();
    }
    if let Some(t) = tags {
        vm.tags = t;
    }
    if let Some(d) = p.get("description") {
        vm.description = d.into();
    }
    if let Some(a) = p.get("agent") {
        vm.agent = a.into();
    }
    if let Some(n) = p.get("name") {
        vm.name = n.into();
    }
    if m == Method::PUT {
        return ok(Value::Null);
    }
    start_task(
        &mut st,
        "qmconfig",
        &id.to_string(),
        &user,
        TaskKind::Config,
        b.task_polls,
    )
}

async fn current_status(PvePath(Vm { vmid }): PvePath<Vm>, Call { fake, params, .. }: Call) -> Reply {
    let (st, _) = fake.lock();
    if let Err(e) = Params::check(params, &[], &[], &[]) {
        return e;
    }
    let Some(vm) = vmid.parse::<u32>().ok().and_then(|id| st.vms.get(&id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    let mut v = json!({"vmid": vm.vmid, "name": vm.name, "status": vm.status,
                       "qmpstatus": vm.status, "cpus": vm.cores,
                       "maxmem": u64::from(vm.memory) * 1024 * 1024, "ha": {"managed": 0}});
    if boolean(vm.agent.strip_prefix("enabled=").unwrap_or(&vm.agent)) == Some(true) {
        v["agent"] = 1.into();
    }
    if let Some(lock) = &vm.lock {
        v["lock"] = lock.clone().into();
    }
    ok(v)
}

async fn start_stop(
    method: Method,
    uri: Uri,
    PvePath(VmAction { vmid, action }): PvePath<VmAction>,
    Call { fake, user, params }: Call,
) -> Reply {
    if action != "start" && action != "stop" {
        return not_implemented(method, uri).await;
    }
    let (mut st, b) = fake.lock();
    let allowed: &[&str] = if action == "start" {
        &["skiplock", "timeout", "machine"]
    } else {
        &["skiplock", "timeout", "keepActive", "overrule-shutdown"]
    };
    if let Err(e) = Params::check(params, allowed, &[], &[]) {
        return e;
    }
    let Some(vm) = vmid.parse::<u32>().ok().and_then(|id| st.vms.get(&id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    let id = vm.vmid;
    if vm.template {
        return fail(500, "you can't start a vm if it's a template");
    }
    if let Some(lock) = &vm.lock {
        return fail(500, &format!("VM is locked ({lock})"));
    }
    if action == "start" && vm.status == "running" {
        return fail(500, &format!("VM {id} already running"));
    }
    let (name, kind) = if action == "start" {
        ("qmstart", TaskKind::Start { vmid: id })
    } else {
        ("qmstop", TaskKind::Stop { vmid: id })
    };
    start_task(&mut st, name, &id.to_string(), &user, kind, b.task_polls)
}

async fn destroy(PvePath(Vm { vmid }): PvePath<Vm>, Call { fake, user, params }: Call) -> Reply {
    let (mut st, b) = fake.lock();
    let p = match Params::check(params, &["purge", "destroy-unreferenced-disks", "skiplock"], &[], &[]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    for k in ["purge", "destroy-unreferenced-disks"] {
        if let Some(v) = p.get(k)
            && boolean(v).is_none()
        {
            return param_fail(&[(k, "type check ('boolean') failed".into())]);
        }
    }
    let Some(vm) = vmid.parse::<u32>().ok().and_then(|id| st.vms.get(&id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    let id = vm.vmid;
    if vm.template {
        return fail(500, &format!("can't remove VM {id} - protection mode enabled"));
    }
    if vm.status == "running" {
        return fail(500, &format!("VM {id} is running - destroy failed"));
    }
    if let Some(lock) = &vm.lock {
        return fail(500, &format!("VM is locked ({lock})"));
    }
    start_task(
        &mut st,
        "qmdestroy",
        &id.to_string(),
        &user,
        TaskKind::Destroy { vmid: id },
        b.task_polls,
    )
}

/// What a task does when it stops; answers its exit status.
fn finish(kind: &TaskKind, st: &mut State, b: &Behaviour) -> String {
    match kind {
        TaskKind::Clone { vmid } => {
            if b.storage_full {
                // Proxmox frees what it allocated and removes the config of a failed clone.
                st.vms.remove(vmid);
                return format!(
                    "clone failed: lvcreate 'pve/vm-{vmid}-disk-0' error:   Volume group \"pve\" has insufficient free space (512 extents): 2560 required."
                );
            }
            if let Some(vm) = st.vms.get_mut(vmid) {
                vm.lock = None;
            }
            "OK".into()
        }
        TaskKind::Config => "OK".into(),
        TaskKind::Start { vmid } => {
            if let Some(vm) = st.vms.get_mut(vmid) {
                vm.status = "running".into();
            }
            "OK".into()
        }
        TaskKind::Stop { vmid } => {
            if let Some(vm) = st.vms.get_mut(vmid) {
                vm.status = "stopped".into();
            }
            "OK".into()
        }
        TaskKind::Destroy { vmid } => {
            st.vms.remove(vmid);
            "OK".into()
        }
    }
}

async fn agent(
    method: Method,
    PvePath(VmAgent { vmid, command }): PvePath<VmAgent>,
    Call { fake, params, .. }: Call,
) -> Reply {
    let checked = match (method.as_str(), command.as_str()) {
        ("GET", "network-get-interfaces") => Params::check(params, &[], &[], &[]),
        ("POST", "file-write") => Params::check(params, &["file", "content", "encode"], &["file", "content"], &[]),
        ("POST", "exec") => Params::check(params, &["command", "input-data"], &["command"], &["command"]),
        ("GET", "exec-status") => Params::check(params, &["pid"], &["pid"], &[]),
        _ => return fail(501, &format!("Method '{method} agent/{command}' not implemented")),
    };
    let p = match checked {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (mut st, b) = fake.lock();
    let Some(vm) = vmid.parse::<u32>().ok().and_then(|id| st.vms.get_mut(&id)) else {
        return no_config(vmid.parse().unwrap_or(0));
    };
    if boolean(vm.agent.strip_prefix("enabled=").unwrap_or(&vm.agent)) != Some(true) {
        return fail(500, "No QEMU guest agent configured");
    }
    if vm.status != "running" {
        return fail(500, &format!("VM {} is not running", vm.vmid));
    }
    if b.agent_never_ready {
        return fail(500, "QEMU guest agent is not running");
    }
    match command.as_str() {
        "network-get-interfaces" => {
            let mut ifaces = vec![json!({"name": "lo", "hardware-address": "00:00:00:00:00:00",
                "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                                 {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}]})];
            let mut eth0 =
                vec![json!({"ip-address": "fe80::be24:11ff:fe00:1", "ip-address-type": "ipv6", "prefix": 64})];
            if !b.ip.is_empty() {
                eth0.insert(0, json!({"ip-address": b.ip, "ip-address-type": "ipv4", "prefix": 24}));
            }
            ifaces.push(json!({"name": "eth0", "hardware-address": "bc:24:11:00:00:01", "ip-addresses": eth0}));
            ok(json!({ "result": ifaces }))
        }
        "file-write" => {
            let content = p.get("content").unwrap();
            if content.len() > 60 * 1024 {
                return param_fail(&[("content", "value may only be 61440 characters long".into())]);
            }
            if let Some(e) = p.get("encode")
                && boolean(e).is_none()
            {
                return param_fail(&[("encode", "type check ('boolean') failed".into())]);
            }
            vm.files.insert(p.get("file").unwrap().into(), content.into());
            ok(Value::Null)
        }
        "exec" => {
            vm.execs.push(p.all("command"));
            ok(json!({ "pid": 1000 + vm.execs.len() }))
        }
        _ => {
            let Some(pid) = p.get("pid").and_then(|p| p.parse::<usize>().ok()) else {
                return param_fail(&[("pid", "type check ('integer') failed".into())]);
            };
            if pid <= 1000 || pid > 1000 + vm.execs.len() {
                return fail(500, &format!("Agent error: Invalid parameter 'pid' ({pid})"));
            }
            ok(json!({"exited": 1, "exitcode": 0}))
        }
    }
}

/// Checks the API token exactly; answers the token id (the task owner) or the refusal.
fn authenticate(given: Option<&str>, token_id: &str, secret: &str) -> Result<String, Reply> {
    let Some(value) = given else {
        return Err(fail(401, "No ticket"));
    };
    let Some(token) = value.strip_prefix("PVEAPIToken=") else {
        return Err(fail(401, "No ticket"));
    };
    let Some((id, given)) = token.split_once('=') else {
        return Err(fail(401, "authentication failure"));
    };
    if id != token_id {
        let (user, name) = id.split_once('!').unwrap_or((id, ""));
        return Err(fail(401, &format!("no such token '{name}' for user '{user}'")));
    }
    if given != secret {
        return Err(fail(401, "invalid token value!"));
    }
    Ok(id.to_string())
}
/// The API: outside `BASE` nothing is served (501 "no such uri"); chunked bodies are refused
/// as pve-http-server refuses them, before anything is recorded; every other request is
/// recorded, then authenticated, then routed.
fn router(fake: Fake) -> Router {
    let nodes = Router::new()
        .route("/nodes/{node}/tasks/{upid}/status", get(task_status))
        .route("/nodes/{node}/qemu/{vmid}", delete(destroy))
        .route("/nodes/{node}/qemu/{vmid}/clone", post(clone_vm))
        .route(
            "/nodes/{node}/qemu/{vmid}/config",
            get(read_config).post(write_config).put(write_config),
        )
        .route("/nodes/{node}/qemu/{vmid}/status/current", get(current_status))
        .route("/nodes/{node}/qemu/{vmid}/status/{action}", post(start_stop))
        .route("/nodes/{node}/qemu/{vmid}/agent/{command}", any(agent))
        .route_layer(middleware::from_fn(known_node));
    let api = Router::new()
        .route("/cluster/nextid", get(nextid))
        .route("/cluster/resources", get(resources))
        .merge(nodes)
        .method_not_allowed_fallback(not_implemented)
        .fallback(not_implemented)
        .layer(middleware::from_fn_with_state(fake.clone(), admit))
        .with_state(fake.clone());
    Router::new()
        .nest(BASE, api)
        .fallback(|| async { fail(501, "no such uri").into_response() })
        .layer(middleware::from_fn_with_state(fake, record))
}

/// As Proxmox answers: JSON, an error's message also in the reason line.
impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let Reply(status, value) = self;
        let code = StatusCode::from_u16(status).expect("a status code");
        let mut response = (code, value.to_string()).into_response();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8"));
        if status >= 400
            && let Some(reason) = value["message"].as_str().and_then(|m| m.lines().next())
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.to_string())
        {
            response.extensions_mut().insert(reason);
        }
        response
    }
}

/// Refuses chunked bodies (501), then records the request as `METHOD /path`, decoded.
async fn record(Shared(fake): Shared<Fake>, request: Request, next: Next) -> Response {
    let chunked = request
        .headers()
        .get(TRANSFER_ENCODING)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
    if chunked {
        return fail(501, "chunked transfer encoding not supported").into_response();
    }
    let path = request.uri().path();
    let shown = percent_decode_str(path)
        .decode_utf8()
        .map_or_else(|_| path.to_string(), |p| p.into_owned());
    fake.state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {shown}", request.method()));
    next.run(request).await
}

/// Checks the API token (401), answers the first request 503 under `flaky_first`, and hands
/// the token id on to the handlers.
async fn admit(Shared(fake): Shared<Fake>, mut request: Request, next: Next) -> Response {
    let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let user = match authenticate(given, &fake.token_id, &fake.token_secret) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    {
        let mut st = fake.state.lock().unwrap();
        if fake.behaviour.flaky_first && !st.flaky_served {
            st.flaky_served = true;
            return fail(503, "Service Unavailable").into_response();
        }
    }
    request.extensions_mut().insert(User(user));
    next.run(request).await
}

#[derive(Deserialize)]
struct OnNode {
    node: String,
}

/// The one node there is: another name fails its hostname lookup.
async fn known_node(PvePath(OnNode { node }): PvePath<OnNode>, request: Request, next: Next) -> Response {
    if node != NODE {
        return fail(
            500,
            &format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

async fn not_implemented(method: Method, uri: Uri) -> Reply {
    let path = percent_decode_str(uri.path()).decode_utf8_lossy();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    fail(
        501,
        &format!("Method '{method} /{}' not implemented", segments.join("/")),
    )
}

/// Path parameters, decoded; a path that does not decode is a 400.
struct PvePath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PvePath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| Self(t))
            .map_err(|_: PathRejection| fail(400, "malformed path").into_response())
    }
}

/// What every endpoint takes: the fake, the token that authenticated the request (`admit`)
/// and the request's parameters as pve-http-server takes them: the query string, and for
/// POST and PUT a form-encoded body (anything else is 415), query parameters winning over
/// body ones; GET and DELETE take theirs in the query only (a body is 400). Each endpoint
/// then checks them against its schema (`Params::check`).
struct Call {
    fake: Fake,
    user: String,
    params: Vec<(String, String)>,
}

impl FromRequest<Fake> for Call {
    type Rejection = Reply;

    async fn from_request(request: Request, fake: &Fake) -> Result<Self, Reply> {
        let User(user) = request
            .extensions()
            .get::<User>()
            .cloned()
            .expect("admit authenticates every request before it is routed");
        let Ok(Query(mut params)) = Query::<Vec<(String, String)>>::try_from_uri(request.uri()) else {
            return Err(fail(400, "malformed query string"));
        };
        let method = request.method().clone();
        if method == Method::POST || method == Method::PUT {
            let ct = request
                .headers()
                .get(CONTENT_TYPE)
                .map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned())
                .unwrap_or_default();
            let main = ct.split(';').next().unwrap_or("").trim();
            if main != "application/x-www-form-urlencoded" {
                return Err(fail(
                    415,
                    &format!("this fake takes application/x-www-form-urlencoded bodies, not '{ct}'"),
                ));
            }
            let Ok(Form(form)) = Form::<Vec<(String, String)>>::from_request(request, fake).await else {
                return Err(fail(400, "malformed form body"));
            };
            let from_query: Vec<String> = params.iter().map(|(k, _)| k.clone()).collect();
            params.extend(form.into_iter().filter(|(k, _)| !from_query.contains(k)));
        } else {
            let Ok(body) = Bytes::from_request(request, fake).await else {
                return Err(fail(400, "unreadable body"));
            };
            if !body.is_empty() {
                return Err(fail(400, &format!("{method} takes its parameters in the query string")));
            }
        }
        Ok(Self {
            fake: fake.clone(),
            user,
            params,
        })
    }
}

#[derive(Deserialize)]
struct Vm {
    vmid: String,
}

#[derive(Deserialize)]
struct TaskPath {
    upid: String,
}

#[derive(Deserialize)]
struct VmAction {
    vmid: String,
    action: String,
}

#[derive(Deserialize)]
struct VmAgent {
    vmid: String,
    command: String,
}
