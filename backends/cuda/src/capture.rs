//! What a step captured into a CUDA graph allocates and keeps, and what the graph holds.
//!
//! Device memory for a step being captured. A stream-ordered allocation made
//! while capturing becomes a graph node, and so does its free: at decode that was two memory
//! nodes per kernel, and every node costs the replay about a microsecond. Allocations from a
//! pool of the program's own, on a stream that is not being captured, become no node at all.
//!
//! Inside one capture a freed buffer is reused by later allocations, which is safe because the
//! graph runs its kernels in capture order. Nothing else allocates from the pool, so the
//! buffers a graph was captured with stay its own between replays.

use crate::device::Gpu;
use crate::CudaError;
use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) struct CapturePool {
    pool: sys::CUmemoryPool,
    /// Allocations and frees only; no kernel runs on it.
    stream: Arc<CudaStream>,
}

impl CapturePool {
    pub(crate) fn new(gpu: &Gpu) -> Result<CapturePool, CudaError> {
        let err = |what: &str, r: sys::CUresult| CudaError::Driver(format!("{what}: {r:?}"));
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = gpu.ctx.ordinal() as i32;
        let mut pool = std::ptr::null_mut();
        gpu.ctx.bind_to_thread().map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        // SAFETY: props describe device memory of this context's GPU; pool receives the handle.
        let r = unsafe { sys::cuMemPoolCreate(&mut pool, &props) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemPoolCreate", r));
        }
        // Keep freed memory in the pool between captures instead of returning it at each sync.
        let mut keep = u64::MAX;
        // SAFETY: the release threshold is a u64 passed through a valid pointer.
        let r = unsafe { sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut keep) as *mut u64 as *mut _) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("cuMemPoolSetAttribute", r));
        }
        let stream = gpu.ctx.new_stream().map_err(|e| CudaError::Driver(format!("creating a stream: {e:?}")))?;
        Ok(CapturePool { pool, stream })
    }

    /// `n` uninitialised elements, freed (back to this pool) when the slice drops.
    ///
    /// # Safety
    /// The caller writes the elements before reading them.
    pub(crate) unsafe fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, CudaError> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the pool and stream are alive; ptr receives the allocation.
        let r = unsafe { sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, self.pool, self.stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver(format!("cuMemAllocFromPoolAsync of {bytes} bytes: {r:?}")));
        }
        // SAFETY: ptr holds n.max(1) elements of T; dropping the slice frees it on this stream.
        Ok(unsafe { self.stream.upgrade_device_ptr(ptr, n.max(1)) })
    }
}

impl Drop for CapturePool {
    fn drop(&mut self) {
        // Buffers still out are freed into it later; the driver destroys it after the last.
        // SAFETY: the pool was created by this struct and is not used after this.
        unsafe {
            let _ = self.stream.synchronize();
            sys::cuMemPoolDestroy(self.pool);
        }
    }
}

/// Device memory of a captured step's constant pointer tables: allocated and written
/// synchronously while capturing (so the graph holds no node for them), freed with the graph.
#[derive(Default)]
pub(crate) struct GraphTables(Vec<sys::CUdeviceptr>);

impl GraphTables {
    /// A device copy of `table`; its address.
    pub(crate) fn add(&mut self, table: &[u64]) -> Result<u64, CudaError> {
        let bytes = std::mem::size_of_val(table);
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: ptr receives an allocation of `bytes`, then `table` is copied into it; plain
        // (not stream-ordered) calls, allowed in a relaxed capture and not captured.
        unsafe {
            drv!(sys::cuMemAlloc_v2(&mut ptr, bytes.max(8)).result());
            self.0.push(ptr);
            drv!(sys::cuMemcpyHtoD_v2(ptr, table.as_ptr() as *const _, bytes).result());
        }
        Ok(ptr)
    }
}

impl Drop for GraphTables {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: allocated by `add`; the graph reading it is destroyed first (field order
            // of `Captured`) or was never made.
            unsafe {
                let _ = sys::cuMemFree_v2(p);
            }
        }
    }
}

/// How many nodes of each kind a CUDA graph has.
pub(crate) fn graph_node_kinds(graph: sys::CUgraph) -> Result<BTreeMap<&'static str, usize>, CudaError> {
    use sys::CUgraphNodeType as T;
    let mut count = 0usize;
    // SAFETY: a null node array asks only for the count; then the array holds `count` nodes.
    unsafe { drv!(sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count).result()) };
    let mut nodes = vec![std::ptr::null_mut(); count];
    unsafe { drv!(sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count).result()) };
    let mut kinds = BTreeMap::new();
    for node in nodes.into_iter().take(count) {
        let mut t = T::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: node belongs to graph.
        unsafe { drv!(sys::cuGraphNodeGetType(node, &mut t).result()) };
        let kind = match t {
            T::CU_GRAPH_NODE_TYPE_KERNEL => "kernel",
            T::CU_GRAPH_NODE_TYPE_MEMCPY => "memcpy",
            T::CU_GRAPH_NODE_TYPE_MEMSET => "memset",
            T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => "memalloc",
            T::CU_GRAPH_NODE_TYPE_MEM_FREE => "memfree",
            T::CU_GRAPH_NODE_TYPE_EMPTY => "empty",
            _ => "other",
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    Ok(kinds)
}
