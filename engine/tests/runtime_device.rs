#![allow(clippy::unwrap_used)]
//! The engine started on the CUDA backend (`EngineDevice::Cuda`). Where there is no driver (or
//! the build has no `cuda` feature) starting is a clear error, never a panic; where there is a
//! GPU, the same scheduler and sampling drive the CUDA forward pass through a request.

mod model_fixture;

use kvroute_engine::api::{EngineEvent, FinishReason, GenerateRequest, Prompt, SamplingParams};
use kvroute_engine::kernels::device::{probe_cuda, CudaOptions, GpuKvBudget};
use kvroute_engine::load::load_path;
use kvroute_engine::runtime::{Engine, EngineConfig, EngineDevice, EngineError};
use std::sync::mpsc::channel;
use std::time::Duration;

fn start(kv: GpuKvBudget) -> Result<Engine, EngineError> {
    let m = load_path(&model_fixture::model_path()).unwrap();
    Engine::start_on(
        m,
        EngineConfig {
            max_num_seqs: 16,
            max_num_batched_tokens: 256,
            max_model_len: Some(1024),
            ..EngineConfig::default()
        },
        EngineDevice::Cuda(CudaOptions {
            kv,
            ..CudaOptions::default()
        }),
    )
}

#[test]
fn cuda_start_fails_clearly_without_a_gpu_or_serves_with_one() {
    match probe_cuda() {
        Err(why) => {
            let e = start(GpuKvBudget::Utilization(0.9)).unwrap_err();
            assert!(matches!(e, EngineError::Device(_)), "{e:?}");
            let msg = e.to_string();
            if cfg!(feature = "cuda") {
                assert!(msg.starts_with("--device cuda: "), "{msg}");
                assert!(msg.contains(&why), "{msg} / {why}");
            } else {
                assert!(msg.contains("no CUDA backend"), "{msg}");
            }
        }
        Ok(_) => {
            // A GPU: a fixed budget that cannot fit is refused naming the flag...
            let e = start(GpuKvBudget::Bytes(1 << 60)).unwrap_err().to_string();
            assert!(e.contains("--kv-memory"), "{e}");
            // ... and vLLM-style sizing serves a greedy request through the step loop.
            let engine = start(GpuKvBudget::Utilization(0.5)).unwrap();
            assert!(engine.info().num_blocks > 0);
            assert_eq!(engine.info().kernels, "cuda");
            let (tx, rx) = channel();
            engine
                .add_request(
                    GenerateRequest {
                        prompt: Prompt::Text("The capital of France is".into()),
                        params: SamplingParams {
                            max_tokens: 8,
                            temperature: 0.0,
                            ignore_eos: true,
                            ..SamplingParams::default()
                        },
                        cache_key: None,
                        hold: None,
                        dispatch: None,
                        only_with_room: false,
                    },
                    Box::new(move |ev| tx.send(ev).is_ok()),
                )
                .unwrap();
            let mut tokens = 0;
            loop {
                match rx.recv_timeout(Duration::from_secs(600)).unwrap() {
                    EngineEvent::Token(_) => tokens += 1,
                    EngineEvent::Finished { reason, .. } => {
                        assert_eq!(reason, FinishReason::Length);
                        break;
                    }
                    EngineEvent::Error(e) => panic!("request failed: {e}"),
                    EngineEvent::NoRoom { need, room } => panic!("no room: {need} > {room}"),
                    EngineEvent::Started { .. } => {}
                }
            }
            assert_eq!(tokens, 8);
            let s = engine.stats();
            assert_eq!(s.capacity.total, engine.info().num_blocks as u64);
            engine.shutdown();
        }
    }
}
