//! `GET /dashboard`: a live page of each agent's KV blocks (used / cached / free, plus this
//! gateway's reservations) and queue, and the admission queue; `GET /dashboard/state`: the same
//! data as JSON, which the page polls. The page also charts `/dashboard/history` and lists the
//! last routing decisions from `/dashboard/decisions`.
//!
//! The page is rendered on the server with the current state (so it shows data without script)
//! and then refreshed by a small inline script. It never changes routing state.

use serde::Serialize;

use super::decisions::DecisionRecord;
use super::types::{AgentSnapshot, QueueSnapshot};

/// Everything the dashboard shows.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardState {
    pub policy: &'static str,
    pub agents: Vec<AgentSnapshot>,
    pub queue: QueueSnapshot,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * part as f64 / total as f64
    }
}

/// One agent's row (the script renders the same markup).
fn agent_row(a: &AgentSnapshot) -> String {
    let total = a.total_blocks;
    let cached = a.cached_blocks.min(a.free_blocks);
    let free = a.free_blocks - cached;
    let used = a.used_blocks;
    let status = if a.eligible {
        "ready"
    } else if a.connected {
        "stale"
    } else {
        "down"
    };
    format!(
        r#"<tr class="agent" data-agent="{id}"><td>{id}<br><small>{ep}</small></td><td>{model}</td><td class="st {status}">{status}</td>
<td><div class="bar"><span class="used" style="width:{pu:.1}%"></span><span class="cached" style="width:{pc:.1}%"></span><span class="free" style="width:{pf:.1}%"></span></div>
<span class="blocks">used {used} / cached {cached} / free {free} of {total} blocks</span>{host}</td>
<td class="num">{reserved}</td><td class="num">{running}</td><td class="num">{waiting}</td><td class="num">{pre}</td></tr>"#,
        id = esc(if a.agent_id.is_empty() {
            &a.endpoint
        } else {
            &a.agent_id
        }),
        ep = esc(&a.endpoint),
        model = esc(&a.model),
        pu = pct(used, total),
        pc = pct(cached, total),
        pf = pct(free, total),
        reserved = a.reserved_blocks,
        running = a.running_requests,
        waiting = a.waiting_requests,
        pre = a.preemptions,
        host = host_bar(a),
    )
}

/// The host tier's bar under the KV bar (nothing for an agent without one).
fn host_bar(a: &AgentSnapshot) -> String {
    if a.host_total_blocks == 0 {
        return String::new();
    }
    let used = a.host_used_blocks.min(a.host_total_blocks);
    format!(
        r#"<div class="bar host"><span class="offloaded" style="width:{pu:.1}%"></span></div><span class="blocks">host tier: {used} of {total} blocks hold evicted prefixes</span>"#,
        pu = pct(used, a.host_total_blocks),
        total = a.host_total_blocks,
    )
}

fn queue_rows(q: &QueueSnapshot) -> String {
    if q.entries.is_empty() {
        return "<tr><td colspan=3>empty</td></tr>".into();
    }
    q.entries
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td>{}</td><td class=num>{}</td></tr>",
                esc(&e.priority),
                esc(&e.tenant),
                e.depth
            )
        })
        .collect()
}

/// One decision's row (the script renders the same markup): when, model, outcome, the agent
/// picked, the queue wait, what decided, and each candidate's score and blocks.
fn decision_row(d: &DecisionRecord) -> String {
    let route = d.route.as_ref();
    let get = |k: &str| route.and_then(|r| r.get(k));
    let agent = get("agent").and_then(|v| v.as_str()).unwrap_or("");
    let waited = get("queue_wait_ms").and_then(|v| v.as_u64());
    let deciding = match get("deciding") {
        Some(v) if !v.is_null() => format!(
            "{} by {} over {}",
            v.get("term").and_then(|t| t.as_str()).unwrap_or("?"),
            v.get("lead").and_then(|t| t.as_f64()).unwrap_or(0.0),
            v.get("over").and_then(|t| t.as_str()).unwrap_or("?"),
        ),
        _ => String::new(),
    };
    let candidates: String = get("candidates")
        .and_then(|c| c.as_array())
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let s = |k: &str| c.get(k).map(|v| v.to_string()).unwrap_or_default();
                    format!(
                        "<li>{}: score {}, cached {}/{} blocks, room {}, TTFT {} s</li>",
                        esc(c.get("agent").and_then(|a| a.as_str()).unwrap_or("")),
                        s("score"),
                        s("cached_blocks"),
                        s("need_blocks"),
                        s("room_blocks"),
                        s("predicted_ttft_s"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let filtered: String = get("filtered")
        .and_then(|c| c.as_array())
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    let s = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("");
                    format!(
                        r#"<li class="filtered">{}: left out, {}</li>"#,
                        esc(s("agent")),
                        esc(s("verdict"))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let candidates = candidates + &filtered;
    format!(
        r#"<tr class="decision"><td class="t" data-t="{t}">{t}</td><td>{model}</td><td>{status} {outcome}</td><td>{agent}</td><td class="num">{waited}</td><td>{deciding}</td><td><ul>{candidates}</ul></td></tr>"#,
        t = d.t_ms,
        model = esc(&d.model),
        status = d.status,
        outcome = d.outcome,
        agent = esc(agent),
        waited = waited.map_or_else(String::new, |w| w.to_string()),
        deciding = esc(&deciding),
    )
}

/// The page, with the current state and the last decisions already in it.
pub fn render(state: &DashboardState, decisions: &[DecisionRecord]) -> String {
    let rows: String = state.agents.iter().map(agent_row).collect();
    let drows: String = if decisions.is_empty() {
        "<tr><td colspan=7>none yet</td></tr>".into()
    } else {
        decisions.iter().map(decision_row).collect()
    };
    PAGE.replace("{{DECISIONS}}", &drows)
        .replace("{{POLICY}}", state.policy)
        .replace("{{AGENTS}}", &rows)
        .replace("{{QDEPTH}}", &state.queue.depth.to_string())
        .replace("{{QCAP}}", &state.queue.capacity.to_string())
        .replace("{{QROWS}}", &queue_rows(&state.queue))
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvroute gateway</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} table{border-collapse:collapse;width:100%;margin-bottom:24px}
td,th{padding:6px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.num{text-align:right}.bar{display:flex;width:360px;height:16px;background:#eee;border-radius:3px;overflow:hidden}
.used{background:#d9534f}.cached{background:#f0ad4e}.free{background:#5cb85c}
.bar.host{height:8px;margin-top:4px}.offloaded{background:#5b8fd9}
.st.ready{color:#2a7}.st.stale{color:#c80}.st.down{color:#c22}small{color:#777}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.charts{display:flex;flex-wrap:wrap;gap:16px;margin-bottom:24px}.chart{width:460px}
.chart svg{width:460px;height:140px;background:#fafafa;border:1px solid #ddd}
.chart h3{font-size:14px;margin:4px 0}.chart polyline{fill:none;stroke-width:1.5}
</style></head>
<body>
<h1>kvroute gateway <small>policy <b id="policy">{{POLICY}}</b></small></h1>
<div class="legend">KV blocks: <span class="used"></span>used<span class="cached"></span>cached (free, holds a prefix)<span class="free"></span>free<span class="offloaded"></span>host tier (evicted prefixes kept in host memory)</div>
<h2>Agents</h2>
<table id="agents"><thead><tr><th>agent</th><th>model</th><th>status</th><th>KV blocks</th><th>reserved</th><th>running</th><th>waiting</th><th>preemptions</th></tr></thead>
<tbody id="agent-rows">{{AGENTS}}</tbody></table>
<h2>Last 15 minutes</h2>
<div class="charts">
<div class="chart"><h3>KV blocks used, per agent</h3><svg id="chart-kv" viewBox="0 0 460 140"></svg><div class="keys" id="keys-kv"></div></div>
<div class="chart"><h3>Admission queue depth</h3><svg id="chart-queue" viewBox="0 0 460 140"></svg></div>
<div class="chart"><h3>Requests/s: answered, 429, errors</h3><svg id="chart-rate" viewBox="0 0 460 140"></svg></div>
<div class="chart"><h3>Time to first token p50 / p99 (s)</h3><svg id="chart-ttft" viewBox="0 0 460 140"></svg></div>
</div>
<h2>Admission queue: <span id="qdepth">{{QDEPTH}}</span> / <span id="qcap">{{QCAP}}</span></h2>
<table id="queue"><thead><tr><th>priority</th><th>tenant</th><th>waiting</th></tr></thead><tbody id="queue-rows">{{QROWS}}</tbody></table>
<h2>Last decisions <small>newest first</small></h2>
<table id="decisions"><thead><tr><th>time</th><th>model</th><th>outcome</th><th>agent</th><th>queue wait (ms)</th><th>deciding term</th><th>candidates</th></tr></thead><tbody id="decision-rows">{{DECISIONS}}</tbody></table>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function pct(p,t){return t?100*p/t:0}
function hostBar(a){if(!a.host_total_blocks)return'';const u=Math.min(a.host_used_blocks,a.host_total_blocks);
return `<div class="bar host"><span class="offloaded" style="width:${pct(u,a.host_total_blocks).toFixed(1)}%"></span></div><span class="blocks">host tier: ${u} of ${a.host_total_blocks} blocks hold evicted prefixes</span>`}
function row(a){const cached=Math.min(a.cached_blocks,a.free_blocks),free=a.free_blocks-cached,t=a.total_blocks;
const st=a.eligible?'ready':(a.connected?'stale':'down');const id=a.agent_id||a.endpoint;
return `<tr class="agent" data-agent="${esc(id)}"><td>${esc(id)}<br><small>${esc(a.endpoint)}</small></td><td>${esc(a.model)}</td><td class="st ${st}">${st}</td>`+
`<td><div class="bar"><span class="used" style="width:${pct(a.used_blocks,t).toFixed(1)}%"></span><span class="cached" style="width:${pct(cached,t).toFixed(1)}%"></span><span class="free" style="width:${pct(free,t).toFixed(1)}%"></span></div>`+
`<span class="blocks">used ${a.used_blocks} / cached ${cached} / free ${free} of ${t} blocks</span>${hostBar(a)}</td>`+
`<td class="num">${a.reserved_blocks}</td><td class="num">${a.running_requests}</td><td class="num">${a.waiting_requests}</td><td class="num">${a.preemptions}</td></tr>`}
async function refresh(){try{const r=await fetch('/dashboard/state');const s=await r.json();
document.getElementById('agent-rows').innerHTML=s.agents.map(row).join('');
document.getElementById('qdepth').textContent=s.queue.depth;
document.getElementById('queue-rows').innerHTML=s.queue.entries.length?s.queue.entries.map(e=>`<tr><td>${esc(e.priority)}</td><td>${esc(e.tenant)}</td><td class=num>${e.depth}</td></tr>`).join(''):'<tr><td colspan=3>empty</td></tr>';
document.body.dataset.updated=Date.now();}catch(e){}}
const COLORS=['#1f77b4','#d62728','#2ca02c','#ff7f0e','#9467bd','#8c564b','#e377c2','#7f7f7f'];
// Draws series [{name,points:[[t,v],...]}] as polylines, y from 0 to the largest value.
function chart(id,series){const svg=document.getElementById(id);if(!svg)return;
const pts=series.flatMap(s=>s.points);if(!pts.length){svg.innerHTML='';return}
const t0=Math.min(...pts.map(p=>p[0])),t1=Math.max(...pts.map(p=>p[0])),ymax=Math.max(...pts.map(p=>p[1]))||1;
const x=t=>t1>t0?4+452*(t-t0)/(t1-t0):230,y=v=>136-128*v/ymax;
svg.innerHTML=series.map((s,i)=>`<polyline class="series" data-name="${esc(s.name)}" data-points="${s.points.length}" stroke="${COLORS[i%COLORS.length]}" points="${s.points.map(p=>x(p[0]).toFixed(1)+','+y(p[1]).toFixed(1)).join(' ')}"></polyline>`).join('')+
`<text x="4" y="12" font-size="10">${ymax.toPrecision(3)}</text>`}
async function history(){try{const r=await fetch('/dashboard/history');const h=(await r.json()).samples;
const names=[...new Set(h.flatMap(s=>s.agents.map(a=>a.agent)))];
chart('chart-kv',names.map(n=>({name:n,points:h.flatMap(s=>s.agents.filter(a=>a.agent===n).map(a=>[s.t_ms,a.used]))})));
document.getElementById('keys-kv').innerHTML=names.map((n,i)=>`<span style="color:${COLORS[i%COLORS.length]}">■ ${esc(n)}</span>`).join(' ');
chart('chart-queue',[{name:'queue',points:h.map(s=>[s.t_ms,s.queue_depth])}]);
const rate=k=>h.slice(1).map((s,i)=>[s.t_ms,Math.max(0,(s[k]-h[i][k])*1000/Math.max(1,s.t_ms-h[i].t_ms))]);
chart('chart-rate',[{name:'ok',points:rate('ok')},{name:'429',points:rate('rejected')},{name:'errors',points:rate('errors')}]);
chart('chart-ttft',['ttft_p50_s','ttft_p99_s'].map(k=>({name:k,points:h.filter(s=>s[k]!==null).map(s=>[s.t_ms,s[k]])})));
document.body.dataset.samples=h.length;}catch(e){}}
function drow(d){const r=d.route||{};const dc=r.deciding?`${r.deciding.term} by ${r.deciding.lead} over ${r.deciding.over}`:'';
const cs=(r.candidates||[]).map(c=>`<li>${esc(c.agent)}: score ${c.score}, cached ${c.cached_blocks}/${c.need_blocks} blocks, room ${c.room_blocks}, TTFT ${c.predicted_ttft_s} s</li>`).join('')+
(r.filtered||[]).map(f=>`<li class="filtered">${esc(f.agent)}: left out, ${esc(f.verdict)}</li>`).join('');
return `<tr class="decision"><td class="t" data-t="${d.t_ms}">${new Date(d.t_ms).toLocaleTimeString()}</td><td>${esc(d.model)}</td><td>${d.status} ${esc(d.outcome)}</td><td>${esc(r.agent||'')}</td><td class="num">${r.queue_wait_ms??''}</td><td>${esc(dc)}</td><td><ul>${cs}</ul></td></tr>`}
async function decisions(){try{const r=await fetch('/dashboard/decisions');const ds=(await r.json()).decisions;
document.getElementById('decision-rows').innerHTML=ds.length?ds.map(drow).join(''):'<tr><td colspan=7>none yet</td></tr>';
document.body.dataset.decisions=ds.length;}catch(e){}}
setInterval(refresh,1000);refresh();setInterval(history,2000);history();setInterval(decisions,2000);decisions();
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(host_total: u64, host_used: u64) -> AgentSnapshot {
        AgentSnapshot {
            slot: 0,
            endpoint: "http://a".into(),
            agent_id: "a<1>".into(),
            model: "m".into(),
            active: true,
            connected: true,
            eligible: true,
            report_age_ms: Some(1),
            epoch: 1,
            total_blocks: 100,
            free_blocks: 60,
            cached_blocks: 20,
            used_blocks: 40,
            reserved_blocks: 0,
            pending_requests: 0,
            running_requests: 1,
            waiting_requests: 0,
            requests_received: 1,
            preemptions: 0,
            gpu_utilization_percent: None,
            prefix_hashes: 0,
            dispatches_acked: 0,
            dispatches_expired: 0,
            over_admissions: 0,
            host_total_blocks: host_total,
            host_used_blocks: host_used,
        }
    }

    #[test]
    fn a_decision_row_names_the_pick_what_decided_and_each_candidate_escaped() {
        let d = DecisionRecord {
            t_ms: 5,
            model: "m<x>".into(),
            prompt_tokens: 10,
            output_tokens: 4,
            status: 200,
            outcome: "routed",
            route: Some(serde_json::json!({
                "agent": "a1", "queue_wait_ms": 7,
                "deciding": {"term": "prefill_s", "lead": 0.25, "over": "a<2>"},
                "candidates": [
                    {"agent": "a1", "score": -0.1, "cached_blocks": 3, "need_blocks": 4, "room_blocks": 50, "predicted_ttft_s": 0.1},
                    {"agent": "a<2>", "score": -0.35, "cached_blocks": 0, "need_blocks": 4, "room_blocks": 60, "predicted_ttft_s": 0.35}
                ],
                "filtered": [{"agent": "a3", "verdict": "stale"}]
            })),
        };
        let row = decision_row(&d);
        assert!(
            row.contains("m&lt;x&gt;") && row.contains("200 routed"),
            "{row}"
        );
        assert!(row.contains("prefill_s by 0.25 over a&lt;2&gt;"), "{row}");
        assert!(
            row.contains("<li>a1: score -0.1, cached 3/4 blocks, room 50, TTFT 0.1 s</li>"),
            "{row}"
        );
        assert!(row.contains(r#"<td class="num">7</td>"#), "{row}");
        assert!(
            row.contains(r#"<li class="filtered">a3: left out, stale</li>"#),
            "{row}"
        );
        // A refusal has no route: outcome only.
        let refused = decision_row(&DecisionRecord {
            status: 429,
            outcome: "queue_full",
            route: None,
            ..d
        });
        assert!(
            refused.contains("429 queue_full") && !refused.contains("<li>"),
            "{refused}"
        );
    }

    #[test]
    fn a_row_shows_the_kv_bar_and_the_host_tier_only_when_there_is_one() {
        let row = agent_row(&agent(0, 0));
        assert!(
            row.contains("used 40 / cached 20 / free 40 of 100 blocks"),
            "{row}"
        );
        assert!(row.contains("a&lt;1&gt;"), "ids are escaped: {row}");
        assert!(!row.contains("host tier"), "{row}");
        let row = agent_row(&agent(8, 3));
        assert!(row.contains("host tier: 3 of 8 blocks"), "{row}");
        assert!(row.contains("width:37.5%"), "{row}");
        // A report claiming more used than total is drawn full, not past the bar.
        let row = agent_row(&agent(8, 12));
        assert!(row.contains("host tier: 8 of 8 blocks"), "{row}");
    }
}
