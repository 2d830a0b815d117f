; One q8_0 row against q8_0 activations (AVX-512 VNNI): per block of 32, the int8 weight codes
; are flipped to unsigned (q + 128, an xor) so that vpdpbusd can multiply them by the
; activation's int8 codes xq: sum((q + 128) xq) - 128 sum(xq) = sum(q xq), exact in int32
; (cs[b] = 128 sum(xq) is computed once per call with the codes). Two blocks per step share
; one 512-bit vpdpbusd (lanes 0-7 block b, 8-15 block b + 1), converted and scaled by
; d * dx[b] into 16 float accumulators; an odd last block takes a 256-bit step.
; `PREFETCH(%ptr: offsets)` lines are expanded by cpu_gguf._expand_prefetch before parsing.

define float @mistralpy_q8_0_vnni_row(i64 %rowa, i64 %xqa, i64 %dxa, i64 %csa, i64 %nb) {
entry:
  %row = inttoptr i64 %rowa to ptr
  %xq = inttoptr i64 %xqa to ptr
  %dx = inttoptr i64 %dxa to ptr
  %cs = inttoptr i64 %csa to ptr
  %npairs = lshr i64 %nb, 1
  %haspairs = icmp ne i64 %npairs, 0
  br i1 %haspairs, label %pairs, label %pairsdone
pairs:
  %i = phi i64 [0, %entry], [%i1, %pairs]
  %acc = phi <16 x float> [zeroinitializer, %entry], [%acc1, %pairs]
  %b = shl i64 %i, 1
  %off = mul i64 %b, 34
  %p0 = getelementptr i8, ptr %row, i64 %off
  %p1 = getelementptr i8, ptr %p0, i64 34
PREFETCH(%p0: 0)
  %dh0 = load half, ptr %p0, align 1
  %d0 = fpext half %dh0 to float
  %dh1 = load half, ptr %p1, align 1
  %d1 = fpext half %dh1 to float
  %pq0 = getelementptr i8, ptr %p0, i64 2
  %q0 = load <32 x i8>, ptr %pq0, align 1
  %pq1 = getelementptr i8, ptr %p1, i64 2
  %q1 = load <32 x i8>, ptr %pq1, align 1
  %q = shufflevector <32 x i8> %q0, <32 x i8> %q1, <64 x i32> <i32 0, i32 1, i32 2, i32 3, i32 4, i32 5, i32 6, i32 7, i32 8, i32 9, i32 10, i32 11, i32 12, i32 13, i32 14, i32 15, i32 16, i32 17, i32 18, i32 19, i32 20, i32 21, i32 22, i32 23, i32 24, i32 25, i32 26, i32 27, i32 28, i32 29, i32 30, i32 31, i32 32, i32 33, i32 34, i32 35, i32 36, i32 37, i32 38, i32 39, i32 40, i32 41, i32 42, i32 43, i32 44, i32 45, i32 46, i32 47, i32 48, i32 49, i32 50, i32 51, i32 52, i32 53, i32 54, i32 55, i32 56, i32 57, i32 58, i32 59, i32 60, i32 61, i32 62, i32 63>
  %qu = xor <64 x i8> %q, splat (i8 -128)
  %xo = mul i64 %b, 32
  %px = getelementptr i8, ptr %xq, i64 %xo
  %x = load <64 x i8>, ptr %px, align 1
  %qi = bitcast <64 x i8> %qu to <16 x i32>
  %xi = bitcast <64 x i8> %x to <16 x i32>
  %t = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> zeroinitializer, <16 x i32> %qi, <16 x i32> %xi)
  %csp = getelementptr i32, ptr %cs, i64 %b
  %c0 = load i32, ptr %csp, align 4
  %csp1 = getelementptr i32, ptr %csp, i64 1
  %c1 = load i32, ptr %csp1, align 4
  %cv0 = insertelement <16 x i32> zeroinitializer, i32 %c0, i64 0
  %cv = insertelement <16 x i32> %cv0, i32 %c1, i64 8
  %ts = sub <16 x i32> %t, %cv
  %tf = sitofp <16 x i32> %ts to <16 x float>
  %dxp = getelementptr float, ptr %dx, i64 %b
  %dx0 = load float, ptr %dxp, align 4
  %dxp1 = getelementptr float, ptr %dxp, i64 1
  %dx1 = load float, ptr %dxp1, align 4
  %dd0 = fmul float %d0, %dx0
  %dd1 = fmul float %d1, %dx1
  %ddp0 = insertelement <2 x float> poison, float %dd0, i64 0
  %ddp = insertelement <2 x float> %ddp0, float %dd1, i64 1
  %ddv = shufflevector <2 x float> %ddp, <2 x float> poison, <16 x i32> <i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 0, i32 1, i32 1, i32 1, i32 1, i32 1, i32 1, i32 1, i32 1>
  %acc1 = call <16 x float> @llvm.fma.v16f32(<16 x float> %tf, <16 x float> %ddv, <16 x float> %acc)
  %i1 = add i64 %i, 1
  %done = icmp eq i64 %i1, %npairs
  br i1 %done, label %pairsdone, label %pairs
pairsdone:
  %accp = phi <16 x float> [zeroinitializer, %entry], [%acc1, %pairs]
  %sp = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> %accp)
  %odd = and i64 %nb, 1
  %hastail = icmp ne i64 %odd, 0
  br i1 %hastail, label %tail, label %exit
tail:
  %tb = sub i64 %nb, 1
  %toff = mul i64 %tb, 34
  %tp = getelementptr i8, ptr %row, i64 %toff
  %tdh = load half, ptr %tp, align 1
  %td = fpext half %tdh to float
  %tpq = getelementptr i8, ptr %tp, i64 2
  %tq = load <32 x i8>, ptr %tpq, align 1
  %tqu = xor <32 x i8> %tq, splat (i8 -128)
  %txo = mul i64 %tb, 32
  %tpx = getelementptr i8, ptr %xq, i64 %txo
  %tx = load <32 x i8>, ptr %tpx, align 1
  %tqi = bitcast <32 x i8> %tqu to <8 x i32>
  %txi = bitcast <32 x i8> %tx to <8 x i32>
  %tt = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> zeroinitializer, <8 x i32> %tqi, <8 x i32> %txi)
  %tsum = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %tt)
  %tcsp = getelementptr i32, ptr %cs, i64 %tb
  %tc = load i32, ptr %tcsp, align 4
  %tdot = sub i32 %tsum, %tc
  %tdf = sitofp i32 %tdot to float
  %tdxp = getelementptr float, ptr %dx, i64 %tb
  %tdx = load float, ptr %tdxp, align 4
  %tdd = fmul float %td, %tdx
  %ts1 = call float @llvm.fma.f32(float %tdf, float %tdd, float %sp)
  br label %exit
exit:
  %y = phi float [%sp, %pairsdone], [%ts1, %tail]
  ret float %y
}
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <8 x i32>, <8 x i32>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare float @llvm.fma.f32(float, float, float)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
