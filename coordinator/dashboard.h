// The coordinator's dashboard: one HTML page with its JavaScript, embedded in the binary (no
// build step, no network fetch: clusters are often offline). It polls the coordinator's own
// JSON endpoints (/api/status, /api/expert-load) and /metrics once a second and draws the
// replicas, the request panels, a per-layer heatmap of expert load, per-layer balancedness bars
// and the overall balancedness over time.
#pragma once

namespace gemma::coordinator {

// The page served at /dashboard.
const char* DashboardHtml();

}  // namespace gemma::coordinator
