//! A small model server on 127.0.0.1 for the probe tests: `POST /score`
//! with `{"text": "..."}` answers `{"label": "positive"|"negative",
//! "score": 0.93}` (positive when the text has "good" in it). It can be
//! told to slow down, to fail with a status, or to answer one input
//! wrong, and it records the `Authorization` header it last saw.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::receivers::read_request;

#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Wait this long before answering.
    pub delay: Duration,
    /// Answer with this status (0: 200).
    pub status: u16,
    /// Inputs whose text contains this are answered wrong.
    pub wrong_for: Option<String>,
}

#[derive(Default)]
struct State {
    behaviour: Behaviour,
    requests: u64,
    authorization: Option<String>,
}

pub struct ModelServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ModelServer {
    pub fn start() -> ModelServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("model server listens");
        let port = listener.local_addr().expect("its port").port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let Some(req) = read_request(&mut conn) else {
                            return;
                        };
                        let b = {
                            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                            s.requests += 1;
                            s.authorization = req.header("authorization").map(str::to_string);
                            s.behaviour.clone()
                        };
                        std::thread::sleep(b.delay);
                        let text = serde_json::from_slice::<serde_json::Value>(&req.body)
                            .ok()
                            .and_then(|v| v["text"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        let mut positive = text.contains("good");
                        if b.wrong_for.as_deref().is_some_and(|w| text.contains(w)) {
                            positive = !positive;
                        }
                        let body = serde_json::json!({
                            "label": if positive { "positive" } else { "negative" },
                            "score": 0.93,
                        })
                        .to_string();
                        let status = if b.status == 0 { 200 } else { b.status };
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.flush();
                    });
                }
            })
        };
        ModelServer {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/score", self.port)
    }

    pub fn set(&self, b: Behaviour) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .behaviour = b;
    }

    pub fn requests(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
    }

    /// The `Authorization` header of the last request.
    pub fn authorization(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .authorization
            .clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
