-- wrk script: a short non-streaming chat completion against `examples/serve.rs`.
-- wrk -t1 -c64 -d10s -s crates/bud-engine-sim/examples/chat.lua http://127.0.0.1:8000
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"demo","messages":[{"role":"user","content":"Say hello to the benchmark"}],"max_tokens":16}'
