// The numeric tolerances of every test, in one place, with what each bounds.
#pragma once

namespace gemma::testing {

// fp32 engine vs transformers fp32 eager: max |ours - ref| <= kLogitRelTol * max |ref|.
inline constexpr double kLogitRelTol = 1e-4;
// Per-layer hidden states, same rule per layer.
inline constexpr double kHiddenRelTol = 1e-4;
// Two runs of our own engine that must agree up to float reassociation (batching, chunking).
inline constexpr double kSelfRelTol = 1e-5;
// bf16 weights: top-1 agreement with the transformers bf16 run.
inline constexpr double kBf16Top1Agreement = 0.99;
// CUDA backend against the CPU backend, op by op and end to end: within two bf16 epsilons
// (2^-7) of max |ref|. Bounds the bf16 rounding of activations before tensor-core products;
// f32 paths land far inside it.
inline constexpr double kCudaRelTol = 1.0 / 128;
// CUDA ops whose inputs stay f32 (norms, elementwise, attention, the few-row product, products
// over f32 weights, the fused experts) against the CPU backend: only summation order and the
// device's transcendental functions differ, so the fp32 reference's bound applies.
inline constexpr double kCudaF32RelTol = 1e-4;
// CUDA attention over a bf16 KV cache against the CPU backend's f32 cache of the same keys
// and values: every cached value moves by at most 2^-9 of itself, so a query seeing one key is
// off by 2^-9 of that value and more keys add the score shifts. Measured by a simulation at the
// op tests' shapes and distributions: 2e-3 to 3.3e-3 of max |ref| on average, 4.7e-3 at worst
// over 200 draws; held to 2^-7.
inline constexpr double kCudaBf16KvRelTol = 1.0 / 128;
// A recorded reference margin must exceed the error we measured by this factor.
inline constexpr double kMarginFactor = 100.0;

}  // namespace gemma::testing
