// Memory, errors, graphs and the element-wise ops of the CUDA backend.
#include "worker/backend/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "kernels/elementwise.h"
#include "kernels/norm.h"
#include "worker/backend/cuda/cuda_check.h"

namespace gemma {

DeviceRegion::~DeviceRegion() {
  if (base != nullptr) cudaFree(base);
}

CudaBuffer::CudaBuffer(DType dtype, int64_t numel, void* data,
                       std::shared_ptr<DeviceRegion> region, size_t offset)
    : Buffer(dtype, numel), data_(data), region_(std::move(region)), offset_(offset) {}

CudaBuffer::~CudaBuffer() {
  if (region_ != nullptr) region_->arena.Free(offset_);
}

const CudaBuffer& AsCuda(const Buffer& b) {
  const auto* c = dynamic_cast<const CudaBuffer*>(&b);
  CHECK(c != nullptr) << "buffer was not allocated by the CUDA backend";
  return *c;
}
CudaBuffer& AsCuda(Buffer& b) {
  auto* c = dynamic_cast<CudaBuffer*>(&b);
  CHECK(c != nullptr) << "buffer was not allocated by the CUDA backend";
  return *c;
}
float* F32Ptr(const Buffer& b) {
  CHECK(b.dtype() == DType::kF32) << "expected an F32 buffer, got " << DTypeName(b.dtype());
  return AsCuda(b).f32();
}
int32_t* I32Ptr(const Buffer& b) {
  CHECK(b.dtype() == DType::kI32) << "expected an I32 buffer, got " << DTypeName(b.dtype());
  return AsCuda(b).i32();
}
kernels::ElemType KvType(const Buffer& b) {
  CHECK(b.dtype() == DType::kF32 || b.dtype() == DType::kBF16)
      << "KV caches must be F32 or BF16, got " << DTypeName(b.dtype());
  return b.dtype() == DType::kF32 ? kernels::ElemType::kF32 : kernels::ElemType::kBF16;
}
kernels::ElemType WeightType(const Buffer& b) {
  CHECK(b.dtype() == DType::kF32 || b.dtype() == DType::kBF16)
      << "weights must be F32 or BF16, got " << DTypeName(b.dtype());
  return b.dtype() == DType::kF32 ? kernels::ElemType::kF32 : kernels::ElemType::kBF16;
}

int CudaBackend::DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls do not see it
    return 0;
  }
  return count;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(CudaBackendOptions options) {
  const int count = DeviceCount();
  if (count == 0) return absl::UnavailableError("no CUDA device is present");
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", options.device, " requested, ", count, " present"));
  }
  if (options.kv_dtype != DType::kF32 && options.kv_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache dtype ", DTypeName(options.kv_dtype), " is not one of F32, BF16"));
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->options_ = options;
  auto fail = [](const char* what, cudaError_t err) {
    return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
  };
  cudaError_t err = cudaSetDevice(options.device);
  if (err != cudaSuccess) return fail("cudaSetDevice", err);
  err = cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking);
  if (err != cudaSuccess) return fail("cudaStreamCreate", err);
  size_t bytes = options.arena_bytes;
  if (bytes == 0) {
    size_t free_bytes = 0, total_bytes = 0;
    err = cudaMemGetInfo(&free_bytes, &total_bytes);
    if (err != cudaSuccess) return fail("cudaMemGetInfo", err);
    bytes = static_cast<size_t>(static_cast<double>(free_bytes) * options.arena_fraction);
  }
  void* base = nullptr;
  err = cudaMalloc(&base, bytes);
  if (err != cudaSuccess) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cudaMalloc of a ", bytes, "-byte arena: ", cudaGetErrorString(err)));
  }
  b->region_ = std::make_shared<DeviceRegion>(base, bytes);
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
    return absl::UnavailableError("cublasCreate failed");
  }
  b->blas_handle_ = blas;
  cublasSetStream(blas, b->stream_);
  cublasLtHandle_t lt = nullptr;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) {
    return absl::UnavailableError("cublasLtCreate failed");
  }
  b->lt_handle_ = lt;
  b->blas_workspace_ = b->Scratch(DType::kI32, static_cast<int64_t>(options.blas_workspace_bytes / 4));
  if (b->blas_workspace_ == nullptr) return b->sticky_;
  cublasSetWorkspace(blas, AsCuda(*b->blas_workspace_).data(), options.blas_workspace_bytes);
  LOG(INFO) << "CUDA backend on device " << options.device << " with a " << (bytes >> 20)
            << " MiB arena, KV cache in " << DTypeName(options.kv_dtype);
  return b;
}

CudaBackend::~CudaBackend() {
  if (capturing_) {  // abandon it
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph != nullptr) {
      cudaGraphDestroy(graph);
    }
    capturing_ = false;
  }
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  DropGraphs();
  lt_plans_.clear();
  if (lt_handle_ != nullptr) cublasLtDestroy(static_cast<cublasLtHandle_t>(lt_handle_));
  if (blas_handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(blas_handle_));
  blas_workspace_.reset();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

bool CudaBackend::Check(cudaError_t err, const char* file, int line) {
  if (err == cudaSuccess) return true;
  if (sticky_.ok()) {
    sticky_ = absl::InternalError(absl::StrCat(file, ":", line, ": CUDA error ",
                                               cudaGetErrorName(err), ": ",
                                               cudaGetErrorString(err)));
    LOG(ERROR) << sticky_;
  }
  return false;
}

bool CudaBackend::CheckStatus(const absl::Status& status) {
  if (status.ok()) return true;
  if (sticky_.ok()) {
    sticky_ = status;
    LOG(ERROR) << sticky_;
  }
  return false;
}

bool CudaBackend::RefuseWhileCapturing(const char* what) {
  if (!capturing_) return false;
  CheckStatus(absl::FailedPreconditionError(
      absl::StrCat(what, " is not allowed while a CUDA graph is being captured")));
  return true;
}

absl::StatusOr<BufferPtr> CudaBackend::Alloc(DType dtype, int64_t numel) {
  if (numel < 0) return absl::InvalidArgumentError(absl::StrCat("negative size ", numel));
  const size_t bytes = static_cast<size_t>(numel) * DTypeSize(dtype);
  std::optional<size_t> offset = region_->arena.Allocate(bytes);
  if (!offset.has_value()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "CUDA arena exhausted: ", bytes, " bytes requested, ", region_->arena.bytes_in_use(),
        " of ", region_->arena.capacity(), " in use, largest free block ",
        region_->arena.largest_free_block()));
  }
  return std::make_unique<CudaBuffer>(dtype, numel, static_cast<char*>(region_->base) + *offset,
                                      region_, *offset);
}

std::shared_ptr<Buffer> CudaBackend::Scratch(DType dtype, int64_t numel) {
  if (capturing_) return GraphScratch(dtype, numel);
  auto buf = Alloc(dtype, numel);
  if (!buf.ok()) {
    CheckStatus(buf.status());
    return nullptr;
  }
  return *std::move(buf);
}

std::shared_ptr<Buffer> CudaBackend::GraphScratch(DType dtype, int64_t numel) {
  CHECK_GE(numel, 0);
  const size_t bytes = static_cast<size_t>(numel) * DTypeSize(dtype);
  // The smallest idle block that fits.
  std::shared_ptr<PoolBlock> block;
  for (const std::shared_ptr<PoolBlock>& b : graph_pool_) {
    if (b->busy || b->buffer->bytes() < bytes) continue;
    if (block == nullptr || b->buffer->bytes() < block->buffer->bytes()) block = b;
  }
  if (block == nullptr) {
    // A new block, its size rounded up to a power of two (at least 1 MiB) so that shapes
    // captured one after another (batch 9, 10, 11, ...) reuse blocks instead of each adding one.
    size_t rounded = size_t{1} << 20;
    while (rounded < bytes) rounded *= 2;
    auto buf = Alloc(DType::kI32, static_cast<int64_t>(rounded / 4));
    if (!buf.ok()) buf = Alloc(DType::kI32, static_cast<int64_t>((bytes + 3) / 4));
    if (!buf.ok()) {
      CheckStatus(buf.status());
      return nullptr;
    }
    block = std::make_shared<PoolBlock>();
    block->buffer = *std::move(buf);
    graph_pool_.push_back(block);
  }
  block->busy = true;
  // A view the op holds while it enqueues its work; its death frees the block for later ops of
  // the capture (they run after this one's nodes).
  return std::shared_ptr<Buffer>(
      new CudaBuffer(dtype, numel, AsCuda(*block->buffer).data(), nullptr, 0),
      [block](Buffer* view) {
        block->busy = false;
        delete view;
      });
}

std::shared_ptr<Buffer> CudaBackend::UploadScratch(DType dtype, const void* src, int64_t numel) {
  // A captured copy would read the host bytes again at every replay.
  if (RefuseWhileCapturing("a host-to-device upload")) return nullptr;
  std::shared_ptr<Buffer> buf = Scratch(dtype, numel);
  if (buf == nullptr) return nullptr;
  // An asynchronous copy from pageable memory is not guaranteed to have read its source when
  // the call returns, and `src` may die right after this call: copy from a host copy that lives
  // until the stream is next waited on.
  const auto* bytes = static_cast<const char*>(src);
  upload_keepalive_.emplace_back(bytes, bytes + buf->bytes());
  if (!Check(cudaMemcpyAsync(AsCuda(*buf).data(), upload_keepalive_.back().data(), buf->bytes(),
                             cudaMemcpyHostToDevice, stream_),
             __FILE__, __LINE__)) {
    return nullptr;
  }
  return buf;
}

absl::StatusOr<BufferPtr> CudaBackend::UploadWeight(DType src_dtype, const void* src,
                                                    int64_t numel) {
  std::vector<float> widened;
  DType dtype = src_dtype;
  if (src_dtype == DType::kF16) {
    widened.resize(numel);
    ConvertToF32(DType::kF16, src, numel, widened.data());
    src = widened.data();
    dtype = DType::kF32;
  } else if (src_dtype != DType::kF32 && src_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights must be F32, BF16 or F16, got ", DTypeName(src_dtype)));
  }
  auto buf = Alloc(dtype, numel);
  if (!buf.ok()) return buf.status();
  cudaError_t err = cudaMemcpyAsync(AsCuda(**buf).data(), src, (*buf)->bytes(),
                                    cudaMemcpyHostToDevice, stream_);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream_);
  if (!Check(err, __FILE__, __LINE__)) return sticky_;
  ReleaseUploads();
  return buf;
}

void CudaBackend::Write(Buffer& dst, const void* src, size_t bytes, size_t offset) {
  CHECK_LE(offset + bytes, dst.bytes()) << "write past the end of a buffer";
  if (RefuseWhileCapturing("Write")) return;
  GEMMA_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(AsCuda(dst).data()) + offset, src, bytes,
                                   cudaMemcpyHostToDevice, stream_));
}

absl::Status CudaBackend::Read(const Buffer& src, void* dst, size_t bytes, size_t offset) {
  if (offset + bytes > src.bytes()) {
    return absl::OutOfRangeError(
        absl::StrCat("read of ", bytes, " bytes at ", offset, " past a buffer of ", src.bytes()));
  }
  if (RefuseWhileCapturing("Read")) return sticky_;
  if (!sticky_.ok()) return sticky_;
  cudaError_t err = cudaMemcpyAsync(dst, static_cast<const char*>(AsCuda(src).data()) + offset,
                                    bytes, cudaMemcpyDeviceToHost, stream_);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream_);
  if (Check(err, __FILE__, __LINE__)) ReleaseUploads();
  return sticky_;
}

absl::Status CudaBackend::Synchronize() {
  if (RefuseWhileCapturing("Synchronize")) return sticky_;
  if (Check(cudaStreamSynchronize(stream_), __FILE__, __LINE__)) ReleaseUploads();
  return sticky_;
}

absl::StatusOr<BufferPtr> CudaBackend::View(Buffer& base, int64_t offset, int64_t numel) {
  if (offset < 0 || numel < 0 || offset + numel > base.numel()) {
    return absl::OutOfRangeError(absl::StrCat("view [", offset, ", ", offset + numel,
                                              ") outside a buffer of ", base.numel()));
  }
  char* data = static_cast<char*>(AsCuda(base).data()) + offset * DTypeSize(base.dtype());
  return std::make_unique<CudaBuffer>(base.dtype(), numel, data, nullptr, 0);
}

void* CudaBackend::RawData(Buffer& b) { return AsCuda(b).data(); }

// ---- graphs ----

absl::Status CudaBackend::BeginCapture() {
  if (capturing_) return absl::FailedPreconditionError("a capture is already under way");
  RETURN_IF_ERROR(sticky_);
  cudaError_t err = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
  if (!Check(err, __FILE__, __LINE__)) return sticky_;
  capturing_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::EndCapture(int64_t key) {
  if (!capturing_) return absl::FailedPreconditionError("EndCapture without BeginCapture");
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamEndCapture(stream_, &graph);
  if (!Check(err, __FILE__, __LINE__) || !sticky_.ok()) {
    // Capture failed, or an op failed during it (the graph is incomplete): nothing is kept.
    if (graph != nullptr) cudaGraphDestroy(graph);
    return sticky_;
  }
  cudaGraphExec_t exec = nullptr;
  err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (!Check(err, __FILE__, __LINE__)) return sticky_;
  auto it = graphs_.find(key);
  if (it != graphs_.end()) cudaGraphExecDestroy(it->second);
  graphs_[key] = exec;
  return absl::OkStatus();
}

absl::Status CudaBackend::Replay(int64_t key) {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    return absl::NotFoundError(absl::StrCat("no CUDA graph captured for key ", key));
  }
  if (capturing_) return absl::FailedPreconditionError("Replay while capturing");
  Check(cudaGraphLaunch(it->second, stream_), __FILE__, __LINE__);
  return sticky_;
}

void CudaBackend::DropGraphs() {
  // The capture under way uses pool blocks: dropping them now would free its memory.
  if (RefuseWhileCapturing("DropGraphs")) return;
  // A replay still running finishes first (destroying its exec is deferred by CUDA), and the
  // pool's blocks go to later work only, which the stream orders after that replay.
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  graphs_.clear();
  graph_pool_.clear();
}

// ---- element-wise ops ----

void CudaBackend::Embed(const Buffer& ids, const Buffer& table, int64_t n, int64_t vocab,
                        int64_t vocab_offset, int64_t hidden, float scale, Buffer& out) {
  CHECK_LE(n * hidden, out.numel());
  GEMMA_CUDA_CHECK(kernels::Embed(I32Ptr(ids), AsCuda(table).data(), WeightType(table), n, vocab,
                                  vocab_offset, hidden, scale, F32Ptr(out), stream_));
}

void CudaBackend::RmsNorm(const Buffer& x, const Buffer* w, int64_t rows, int64_t dim, float eps,
                          Buffer& out) {
  CHECK_LE(rows * dim, x.numel());
  CHECK_LE(rows * dim, out.numel());
  GEMMA_CUDA_CHECK(kernels::RmsNorm(F32Ptr(x), w != nullptr ? AsCuda(*w).data() : nullptr,
                                    w != nullptr ? WeightType(*w) : kernels::ElemType::kF32, rows,
                                    dim, eps, F32Ptr(out), stream_));
}

void CudaBackend::AddRmsNorm(Buffer& residual, const Buffer& x, const Buffer& w,
                             const Buffer* scalar, int64_t rows, int64_t dim, float eps) {
  CHECK_LE(rows * dim, residual.numel());
  CHECK_LE(rows * dim, x.numel());
  kernels::AddRmsNormParams p;
  p.residual = F32Ptr(residual);
  p.x = F32Ptr(x);
  p.w = AsCuda(w).data();
  p.w_type = WeightType(w);
  if (scalar != nullptr) {
    p.scalar = AsCuda(*scalar).data();
    p.scalar_type = WeightType(*scalar);
  }
  p.rows = rows;
  p.dim = dim;
  p.eps = eps;
  GEMMA_CUDA_CHECK(kernels::AddRmsNorm(p, stream_));
}

void CudaBackend::Add(const Buffer& a, const Buffer& b, int64_t n, Buffer& out) {
  GEMMA_CUDA_CHECK(kernels::Add(F32Ptr(a), F32Ptr(b), n, F32Ptr(out), stream_));
}

void CudaBackend::HeadNormRope(Buffer& x, const Buffer* w, const Buffer& positions,
                               int64_t num_tokens, int64_t num_heads, const RopeSpec& rope,
                               float eps) {
  CHECK_GT(rope.head_dim, 0);
  CHECK_LE(num_tokens * num_heads * rope.head_dim, x.numel());
  kernels::HeadNormRopeParams p;
  p.x = F32Ptr(x);
  if (w != nullptr) {
    p.w = AsCuda(*w).data();
    p.w_type = WeightType(*w);
  }
  p.positions = I32Ptr(positions);
  p.num_tokens = num_tokens;
  p.num_heads = num_heads;
  p.rope = {rope.head_dim, rope.rotary_pairs, rope.theta, rope.factor};
  p.eps = eps;
  GEMMA_CUDA_CHECK(kernels::HeadNormRope(p, stream_));
}

void CudaBackend::WriteKv(const Buffer* k, const Buffer& v, const Buffer& slots,
                          int64_t num_tokens, int64_t row_elems, Buffer* k_cache,
                          Buffer& v_cache) {
  CHECK((k == nullptr) == (k_cache == nullptr)) << "k and k_cache must both be given or not";
  const kernels::ElemType cache_type = KvType(v_cache);
  CHECK(k_cache == nullptr || k_cache->dtype() == v_cache.dtype())
      << "k and v caches must share a dtype";
  GEMMA_CUDA_CHECK(kernels::WriteKv(k != nullptr ? F32Ptr(*k) : nullptr, F32Ptr(v),
                                    I32Ptr(slots), num_tokens, row_elems,
                                    v_cache.numel() / row_elems,
                                    k_cache != nullptr ? AsCuda(*k_cache).data() : nullptr,
                                    AsCuda(v_cache).data(), cache_type, stream_));
}

void CudaBackend::GeluMul(const Buffer& gate_up, int64_t n, int64_t inter, Buffer& out) {
  GEMMA_CUDA_CHECK(kernels::GeluMul(F32Ptr(gate_up), n, inter, F32Ptr(out), stream_));
}

void CudaBackend::Softcap(Buffer& x, int64_t n, float cap) {
  GEMMA_CUDA_CHECK(kernels::Softcap(F32Ptr(x), n, cap, stream_));
}

void CudaBackend::GatherRows(const Buffer& x, const Buffer& rows, int64_t num_rows, int64_t dim,
                             Buffer& out) {
  GEMMA_CUDA_CHECK(kernels::GatherRows(F32Ptr(x), x.numel() / dim, I32Ptr(rows), num_rows, dim,
                                       F32Ptr(out), stream_));
}

void CudaBackend::GatherSumRows(const Buffer& x, const Buffer& idx, int64_t rows, int64_t k,
                                int64_t dim, Buffer& out) {
  GEMMA_CUDA_CHECK(kernels::GatherSumRows(F32Ptr(x), x.numel() / dim, I32Ptr(idx), rows, k, dim,
                                          F32Ptr(out), stream_));
}

}  // namespace gemma
