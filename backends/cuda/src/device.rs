//! The GPU: context, stream, cuBLAS, and NVRTC compilation with an on-disk PTX cache keyed by
//! a hash of the source, the NVRTC options and the GPU architecture.

use crate::CudaError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::path::PathBuf;
use std::sync::Arc;

/// Why there is no usable GPU, or `None` when there is one. Never panics (cudarc's dynamic
/// loading panics when a library is missing, so presence is checked first).
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries.
    let (drv, rtc, blas) = unsafe {
        (cudarc::driver::sys::is_culib_present(), cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present())
    };
    if !drv {
        return Some("no CUDA driver library (libcuda) found".into());
    }
    if !rtc {
        return Some("no NVRTC library (libnvrtc) found".into());
    }
    if !blas {
        return Some("no cuBLAS library (libcublas) found".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no device".into()),
        Err(e) => Some(format!("the CUDA driver failed: {e:?}")),
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub arch: &'static str,
    pub name: String,
    /// The most dynamic shared memory one block may ask for (227 KB on Hopper, 163 KB on
    /// A100, 99 KB on consumer parts): the tiled scans are planned within it.
    pub max_smem: usize,
    /// Streaming multiprocessors.
    pub sms: usize,
    /// cuBLAS's workspace, ours for the handle's lifetime: otherwise cuBLAS allocates one per
    /// split-K call, and inside a captured step each of those is a graph node pair.
    _blas_workspace: CudaSlice<u8>,
}

/// Bytes of cuBLAS workspace (what cuBLAS itself recommends on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => "sm_80",
    }
}

pub(crate) fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPARKC_CACHE_DIR") {
        return PathBuf::from(d).join("cuda");
    }
    let home = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    home.unwrap_or_else(std::env::temp_dir).join("sparkc").join("cuda")
}

/// The device memory pool: stream-ordered allocations (cuMemAllocAsync) come from the device's
/// default pool; raising its release threshold keeps freed blocks in the pool instead of
/// returning them to the driver at every synchronisation, so a training step or decode step
/// reuses the previous one's memory without new driver allocations.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
    use cudarc::driver::sys;
    let err = |what: &str, r: sys::CUresult| CudaError::Driver(format!("{what}: {r:?}"));
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver calls on the context's device with valid out-pointers.
    unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuDeviceGetDefaultMemPool", r));
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold) as *mut u64 as *mut _);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemPoolSetAttribute", r));
        }
    }
    Ok(())
}

fn default_pool(ctx: &Arc<CudaContext>) -> Result<cudarc::driver::sys::CUmemoryPool, CudaError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver query with a valid out-pointer.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Driver(format!("cuDeviceGetDefaultMemPool: {r:?}")));
    }
    Ok(pool)
}

impl Gpu {
    /// The most device memory the allocation pool has held since the last
    /// [`Gpu::reset_peak_memory`] (activations and temporaries; parameters too, as they come
    /// from the same pool).
    pub fn peak_memory(&self) -> Result<u64, CudaError> {
        use cudarc::driver::sys;
        let pool = default_pool(&self.ctx)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a u64 written through a valid pointer.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut v) as *mut u64 as *mut _) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver(format!("cuMemPoolGetAttribute: {r:?}")));
        }
        Ok(v)
    }

    pub fn reset_peak_memory(&self) -> Result<(), CudaError> {
        use cudarc::driver::sys;
        let pool = default_pool(&self.ctx)?;
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark takes a u64 zero through a valid pointer.
        let r = unsafe { sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero) as *mut u64 as *mut _) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver(format!("cuMemPoolSetAttribute: {r:?}")));
        }
        Ok(())
    }

    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        if let Some(why) = unavailable_reason() {
            return Err(CudaError::Unavailable(why));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(format!("cannot open GPU {ordinal}: {e:?}")))?;
        // One stream: per-buffer events for cross-stream ordering would only cost two event
        // creations per allocation.
        // SAFETY: nothing here uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(|e| CudaError::Driver(format!("creating a stream: {e:?}")))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let max_smem = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| CudaError::Driver(format!("{e:?}")))? as usize;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::Driver(format!("{e:?}")))? as usize;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(|e| CudaError::Driver(format!("cuBLAS workspace: {e:?}")))?;
        {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of this Gpu,
            // the handle declared first so it is dropped first).
            let r = unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, BLAS_WORKSPACE) };
            if r != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Driver(format!("cublasSetWorkspace: {r:?}")));
            }
        }
        Ok(Gpu { ctx, stream, blas, arch: arch_name(major, minor), name, max_smem, sms, _blas_workspace: workspace })
    }

    /// Compile CUDA C to PTX (or take it from the cache) and load it, with IEEE arithmetic
    /// and no contraction: the same rounding as the CPU oracle, which the goldens check.
    pub fn load(&self, src: &str) -> Result<Arc<CudaModule>, CudaError> {
        self.load_with(src, false)
    }

    /// [`Gpu::load`]; `fast` compiles with fast math (approximate exp/log/division, fused
    /// multiply-add, denormals flushed) for bf16 programs, whose storage rounds far more.
    pub fn load_with(&self, src: &str, fast: bool) -> Result<Arc<CudaModule>, CudaError> {
        let opts_key = if fast { "use_fast_math" } else { "fmad=false" };
        let fast_src;
        let src = if fast {
            fast_src = format!("#define SP_FAST 1\n{src}");
            fast_src.as_str()
        } else {
            src
        };
        let key = format!("{:016x}", fnv64(&[src, opts_key, self.arch]));
        let dir = cache_dir();
        let path = dir.join(format!("{key}.ptx"));
        let ptx = match std::fs::read_to_string(&path) {
            Ok(text) => Ptx::from_src(text),
            Err(_) => {
                let opts = if fast {
                    // cudarc's `use_fast_math` only turns on `--fmad`; the flag itself also
                    // flushes denormals and approximates division and square roots.
                    CompileOptions { fmad: Some(true), arch: Some(self.arch), options: vec!["--use_fast_math".into()], ..Default::default() }
                } else {
                    CompileOptions { fmad: Some(false), arch: Some(self.arch), ..Default::default() }
                };
                let ptx = compile_ptx_with_opts(src, opts).map_err(|e| CudaError::Compile(format!("{e}")))?;
                // A failed cache write only costs a recompile next time.
                if std::fs::create_dir_all(&dir).is_ok() {
                    let tmp = dir.join(format!("{key}.ptx.tmp-{}", std::process::id()));
                    if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                }
                ptx
            }
        };
        self.ctx.load_module(ptx).map_err(|e| CudaError::Driver(format!("loading the module: {e:?}")))
    }
}
